"""The `mlx-lora` command line: train, generate, demo (and more as they land)."""

import dataclasses

import click

from mlx_lora.config import TrainConfig, build_config, read_config_file
from mlx_lora.errors import UserError


class Cli(click.Group):
    """A click group that turns UserError into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        from mlx_lora.train.loop import TrainingInterrupted

        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except TrainingInterrupted as e:
            click.echo(str(e), err=True)
            ctx.exit(130)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"],
                                        "max_content_width": 100})
@click.version_option(package_name="mlx-lora")
def cli():
    """Fine-tune language models with LoRA and QLoRA on MLX."""


def config_options(command):
    """One click option per TrainConfig field; default None so a config file can fill it."""
    for field in reversed(dataclasses.fields(TrainConfig)):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']}  [default: {field.default!r}]"
        if field.type is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=None,
                                  help=help_text)
        else:
            choices = field.metadata.get("choices")
            kind = click.Choice(choices) if choices else field.type
            option = click.option(flag, field.name, type=kind, default=None, help=help_text)
        command = option(command)
    return command


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML or JSON file with the same keys as the flags (mlx-lm's lora keys "
                   "too); flags override it.  [default: none]")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in "
              "--adapter-path.  [default: off]")
@click.option("--overwrite", is_flag=True, help="Replace another run's files in "
              "--adapter-path.  [default: off]")
@config_options
def train(config_file, resume, overwrite, **flags):
    """Fine-tune adapters on a base model."""
    from mlx_lora.train.run import train as run_training

    file_values = read_config_file(config_file) if config_file else {}
    config = build_config(file_values, flags, config_file or "command line")
    for key in ("model", "data"):
        if not getattr(config, key):
            raise UserError(f"--{key} is required (on the command line or in --config)")
    run_training(config, resume=resume, overwrite=overwrite)


@cli.command()
@click.option("--model", required=True, help="Base model: Hub id or directory.")
@click.option("--adapter-path", default=None, help="Adapter directory.  [default: none]")
@click.option("--prompt", required=True, help="The prompt.")
@click.option("--max-tokens", default=100, show_default=True, help="Tokens to generate.")
@click.option("--temp", default=0.0, show_default=True, help="Sampling temperature; 0 = greedy.")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Wrap the prompt in the tokenizer's chat template when it has one.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run.")
def generate(model, adapter_path, prompt, max_tokens, temp, chat, trust_remote_code):
    """Generate text with a base model and optional adapters."""
    from mlx_lora.generation import complete, load_for_inference

    loaded = load_for_inference(model, adapter_path, trust_remote_code)
    click.echo(complete(loaded, prompt, max_tokens, temp, chat))


@cli.command()
@click.option("--model", required=True, help="The model whose tokenizer and template to use.")
@click.option("--data", required=True, help="Directory with train.jsonl [valid, test] or a file.")
@click.option("--max-seq-length", default=2048, show_default=True, help="Truncation length.")
@click.option("--mask-prompt/--no-mask-prompt", default=False, show_default=True,
              help="Train only on completions / every assistant turn.")
def data(model, data, max_seq_length, mask_prompt):
    """Check a data set and show what training will see: counts and the targets of one record."""
    from mlx_lora.data.inspect import inspect_data
    from mlx_lora.load import load_tokenizer_only

    tokenizer = load_tokenizer_only(model)
    stats, first = inspect_data(data, tokenizer, max_seq_length, mask_prompt)
    for s in stats:
        click.echo(f"{s.split}: {s.file} ({s.formats}): {s.records} records -> {s.examples} "
                   f"examples, {s.tokens:,} tokens ({s.target_tokens:,} carry loss), longest "
                   f"{s.longest}, {s.truncated} truncated")
    if first is not None:
        click.echo("first training example, targets between ⟦ and ⟧:")
        click.echo(first)


@cli.command()
@click.argument("adapter_dir", type=click.Path(file_okay=False))
def plot(adapter_dir):
    """Draw ADAPTER_DIR/loss.svg (training and validation loss) from its metrics.jsonl."""
    from mlx_lora.plot import plot_run

    click.echo(plot_run(adapter_dir))


@cli.command()
@click.option("--model", default=None, help="A real model to use instead of the built-in tiny "
              "one (Hub id or directory).  [default: built-in]")
@click.option("--data", default=None, help="A data set to use instead of the built-in task. "
              "[default: built-in]")
@click.option("--output", default="mlx_lora_demo", show_default=True,
              help="Directory for everything the demo writes.")
@click.option("--iters", default=None, type=int, help="Training steps.  [default: the demo's]")
def demo(model, data, output, iters):
    """Offline end-to-end demo: make a model and task, fine-tune (QLoRA), evaluate, generate."""
    from mlx_lora.demo import run_demo

    run_demo(output, model=model, data=data, iters=iters)


def _default(name: str):
    """A TrainConfig field's default, so a flag shared with train has one home for it."""
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


@cli.command()
@click.option("--model", required=True, help="Base model: Hub id or directory.")
@click.option("--adapter-path", "--adapter", "adapter_path", default=_default("adapter_path"),
              show_default=True, help="Adapter directory (mlx-lm or PEFT).")
@click.option("--save-path", "--output", "save_path", default="fused_model", show_default=True,
              help="Directory for the fused model.")
@click.option("--dequantize", is_flag=True, help="Write a float model (transformers loads it "
              "too).  [default: off]")
@click.option("--quantize", default=0, show_default=True, type=int,
              help="Re-quantize every layer to this many bits; 0 = keep the base's precision.")
@click.option("--group-size", default=_default("group_size"), show_default=True,
              help="Group size for --quantize.")
@click.option("--delta-tolerance", default=None, type=float,
              help="Keep an adapted layer of a quantized base at its bits only if its update "
                   "survives within this relative error; else 8 bits, else float.  "
                   "[default: 0.1]")
@click.option("--overwrite", is_flag=True, help="Replace --save-path if it is not empty.  "
              "[default: off]")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run.")
def fuse(model, adapter_path, save_path, dequantize, quantize, group_size, delta_tolerance,
         overwrite, trust_remote_code):
    """Fold adapters into the base and save a model dir that mlx_lm.load serves."""
    from mlx_lora.fuse import DELTA_TOLERANCE
    from mlx_lora.fuse import fuse as run_fuse

    tolerance = DELTA_TOLERANCE if delta_tolerance is None else delta_tolerance
    result = run_fuse(model, adapter_path, save_path, dequantize=dequantize, quantize=quantize,
                      group_size=group_size, tolerance=tolerance, overwrite=overwrite,
                      trust_remote_code=trust_remote_code)
    click.echo(f"fused model saved to {result.save_path}")


@cli.command(name="eval")
@click.option("--model", required=True, help="Base model: Hub id or directory.")
@click.option("--adapter-path", default=None, help="Adapter directory (mlx-lm or PEFT).  "
              "[default: none, the base alone]")
@click.option("--data", required=True, help="Data directory (or one .jsonl/.txt file).")
@click.option("--split", default="test", show_default=True, help="Which split of --data.")
@click.option("--generate", default=0, show_default=True, type=int,
              help="Exact-match accuracy of greedy generations on the first N prompt/"
                   "completion or chat records; -1 = all, 0 = none.")
@click.option("--max-seq-length", default=_default("max_seq_length"), show_default=True,
              help="Longer records are truncated to this many tokens.")
@click.option("--batch-size", default=_default("batch_size"), show_default=True,
              help="Records per batch for the loss.")
@click.option("--mask-prompt/--no-mask-prompt", default=_default("mask_prompt"),
              show_default=True, help="Loss on completions / assistant turns only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last "
              "line of stdout (everything else on stderr).  [default: off]")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run.")
def eval_command(model, adapter_path, data, split, generate, max_seq_length, batch_size,
                 mask_prompt, as_json, trust_remote_code):
    """Loss, perplexity and (with --generate) exact-match accuracy on a data split."""
    import json
    import sys

    from mlx_lora.evaluate import evaluate, split_file
    from mlx_lora.formats.convert import load_adapted

    data_file = split_file(data, split)
    loaded, _ = load_adapted(model, adapter_path, trust_remote_code)
    result = evaluate(loaded, data_file, split=split, batch_size=batch_size,
                      max_seq_length=max_seq_length, mask_prompt=mask_prompt, generate=generate)
    lines = [f"{data_file}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} "
             f"over {result.tokens:,} tokens of {result.records} records"]
    if result.accuracy is not None:
        lines.append(f"exact match: {result.accuracy:.1%} of {result.generated} generations")
    for line in lines:
        click.echo(line, err=as_json)
    if as_json:
        sys.stderr.flush()
        click.echo(json.dumps(result.to_dict()))


@cli.command()
@click.option("--adapter-path", "--adapter", "adapter_path", default=_default("adapter_path"),
              show_default=True, help="Adapter directory to convert (mlx-lm or PEFT).")
@click.option("--format", "fmt", type=click.Choice(["peft", "mlx-lm"]), default="peft",
              show_default=True, help="Format to write.")
@click.option("--save-path", "--output", "save_path", required=True,
              help="Directory to write the converted adapter.")
def export(adapter_path, fmt, save_path):
    """Convert an adapter to Hugging Face PEFT's format (or a PEFT one to mlx-lm's)."""
    from mlx_lora.formats.convert import export_adapter

    source = export_adapter(adapter_path, fmt, save_path)
    click.echo(f"converted {adapter_path} ({source}) to {fmt} in {save_path}")


@cli.command(name="import")
@click.option("--adapter-path", required=True, help="A PEFT adapter directory.")
@click.option("--save-path", required=True, help="Directory for the mlx-lm adapter.")
def import_command(adapter_path, save_path):
    """Convert a Hugging Face PEFT adapter to mlx-lm's format (same as export --format mlx-lm)."""
    from mlx_lora.formats.convert import export_adapter

    export_adapter(adapter_path, "mlx-lm", save_path)
    click.echo(f"converted {adapter_path} (peft) to mlx-lm in {save_path}")


def main() -> None:
    """Console entry point."""
    cli.main(prog_name="mlx-lora")

