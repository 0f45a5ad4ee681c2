"""The `mlx-lora` command line: a thin layer over the Python API and the pipeline stages."""

import dataclasses

import click

from mlx_lora.config import (
    FIELDS,
    EvalConfig,
    ExportConfig,
    FuseConfig,
    GenerateConfig,
    ServeConfig,
    TrainConfig,
)
from mlx_lora.errors import UserError

FEATURES = ("prompt_feature", "completion_feature", "text_feature", "chat_feature")
HUB_KEYS = ("dataset_config", "train_split", "valid_split", "test_split")


class Cli(click.Group):
    """A click group that turns UserError into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"],
                                        "max_content_width": 100})
@click.version_option(package_name="mlx-lora")
def cli():
    """Fine-tune language models with LoRA and QLoRA on MLX."""


def options(config_class, names=None, unset: bool = False):
    """One click option per field of a config dataclass (or the named ones), help from it.

    unset=True gives every option the default None, so a config file can fill what the
    command line leaves out; the help still shows the real default.
    """
    fields = [f for f in dataclasses.fields(config_class) if names is None or f.name in names]

    def decorate(command):
        for field in reversed(fields):
            flag = "--" + field.name.replace("_", "-")
            default = None if unset else field.default
            help_text = f"{field.metadata['help']}  [default: {field.default!r}]"
            if field.type is bool:
                option = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=default,
                                      help=help_text)
            else:
                choices = field.metadata.get("choices")
                kind = click.Choice(choices) if choices else field.type
                aliases = ["--" + a.replace("_", "-") for a in field.metadata.get("aliases", ())]
                # A field with a flag_value takes an optional value: the bare flag means it.
                optional = ({"is_flag": False, "flag_value": field.metadata["flag_value"]}
                            if "flag_value" in field.metadata else {})
                option = click.option(flag, *aliases, field.name, type=kind, default=default,
                                      help=help_text, **optional)
            command = option(command)
        return command

    return decorate


def model_option(command):
    """--model, required."""
    return click.option("--model", required=True, help=FIELDS["model"].metadata["help"])(command)


def remote_code_option(command):
    """--trust-remote-code."""
    return click.option("--trust-remote-code", is_flag=True,
                        help=FIELDS["trust_remote_code"].metadata["help"])(command)


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML or JSON file with the same keys as the flags (mlx-lm's lora keys "
                   "too); flags override it.  [default: none]")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in "
              "--adapter-path.  [default: off]")
@click.option("--overwrite", is_flag=True, help="Replace another run's files in "
              "--adapter-path.  [default: off]")
@options(TrainConfig, unset=True)
def train(config_file, resume, overwrite, **flags):
    """Fine-tune adapters on a base model."""
    from mlx_lora.api import Finetune
    from mlx_lora.train.run import interrupted_message

    run = Finetune(config=config_file, resume=resume, overwrite=overwrite, **flags)
    result = run.train()
    if not result.finished:
        if result.rank == 0:  # of several processes, rank 0 saved the checkpoint and says so
            click.echo(interrupted_message(result), err=True)
        raise click.exceptions.Exit(130)


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="The base run: a file as train --config takes; flags override it.  "
                   "[default: none]")
@click.option("--grid", "grid", multiple=True, required=True, metavar="KEY=V1,V2",
              help="A train option and the values to try (learning_rate=1e-4,3e-4); repeat "
                   "for more keys: every combination runs.")
@click.option("--output", default="sweep", show_default=True,
              help="Directory for one run directory per combination, sweep.md, sweep.json "
                   "and best.yaml.")
@options(TrainConfig, names=tuple(name for name in FIELDS if name != "adapter_path"),
         unset=True)
def sweep(config_file, grid, output, **flags):
    """Train every combination of --grid values in turn; rank them by validation loss.

    Rerunning the same command skips finished runs and resumes an interrupted one.
    """
    from mlx_lora.sweep import run_sweep

    result = run_sweep(config_file, grid, output, flags)
    if not result.finished:
        raise click.exceptions.Exit(130)
    click.echo(result.table, nl=False)
    if result.best_config:
        click.echo(f"best run's config: {result.best_config} (mlx-lora train --config takes it)")
    else:
        click.echo("no run had validation data, so none is best (add valid.jsonl)")


@cli.command()
@model_option
@click.option("--adapter-path", default=None, help="Adapter directory (mlx-lm or PEFT).  "
              "[default: none, the base alone]")
@click.option("--prompt", required=True, help="The prompt.")
@options(GenerateConfig)
@remote_code_option
def generate(model, adapter_path, prompt, max_tokens, temp, chat, trust_remote_code):
    """Generate text with a base model and optional adapters."""
    from mlx_lora.api import Finetune

    run = Finetune(model, adapter_path=adapter_path, trust_remote_code=trust_remote_code)
    click.echo(run.generate(prompt, max_tokens=max_tokens, temp=temp, chat=chat))


@cli.command()
@model_option
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="An adapter directory (mlx-lm or PEFT) served as model NAME; repeat for "
                   "more.  [default: none, the base alone]")
@options(ServeConfig)
@remote_code_option
def serve(model, adapters, trust_remote_code, **settings):
    """Serve the base and its adapters over OpenAI's HTTP API; a request's "model" picks the
    adapter (the base's name, or "base", none). Requests take turns a few tokens at a time."""
    from mlx_lora.console import status
    from mlx_lora.serve import start_server
    from mlx_lora.serve.adapters import parse_adapter_args

    server = start_server(model, parse_adapter_args(adapters), ServeConfig(**settings),
                          trust_remote_code)
    names = ", ".join(server.adapters.model_names())
    status(f"serving {names} at {server.url} (Ctrl-C to stop)")
    server.wait()


@cli.command()
@model_option
@click.option("--data", required=True, help=FIELDS["data"].metadata["help"])
@options(TrainConfig, names=("max_seq_length", "mask_prompt", *HUB_KEYS, *FEATURES))
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object "
              "instead.  [default: off]")
@remote_code_option
def data(model, data, max_seq_length, mask_prompt, as_json, trust_remote_code, **data_keys):
    """Report on a data set: formats, lengths, truncations, duplicates, refused records, and
    the targets of one example."""
    import json

    from mlx_lora.config import features, hub_splits
    from mlx_lora.data.inspect import inspect_data, report_lines
    from mlx_lora.model.load import context_length, load_tokenizer_only

    config = TrainConfig(**data_keys)
    tokenizer = load_tokenizer_only(model, trust_remote_code)
    context = context_length(model, trust_remote_code)
    reports, first = inspect_data(data, tokenizer, max_seq_length, mask_prompt,
                                  features(config), hub_splits(config), context)
    if as_json:
        click.echo(json.dumps({"context": context, "max_seq_length": max_seq_length,
                               "splits": [r.to_dict() for r in reports]}))
        return
    for report in reports:
        for line in report_lines(report, max_seq_length, context):
            click.echo(line)
    if first is not None:
        click.echo("first training example, targets between ⟦ and ⟧:")
        click.echo(first)


@cli.command()
@click.argument("adapter_dir", type=click.Path(file_okay=False))
def plot(adapter_dir):
    """Draw ADAPTER_DIR/loss.svg (training, validation, general-text loss) from metrics.jsonl."""
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
    from mlx_lora.demo.run import run_demo

    run_demo(output, model=model, data=data, iters=iters)


@cli.command()
@model_option
@click.option("--adapter-path", "--adapter", "adapter_path",
              default=FIELDS["adapter_path"].default, show_default=True,
              help="Adapter directory (mlx-lm or PEFT).")
@click.option("--save-path", "--output", "save_path", default=FuseConfig.save_path,
              show_default=True, help="Directory for the fused model.")
@options(FuseConfig, names=("dequantize", "quantize", "group_size", "delta_tolerance"))
@click.option("--overwrite", is_flag=True, help="Replace --save-path if it is not empty.  "
              "[default: off]")
@remote_code_option
def fuse(model, adapter_path, save_path, dequantize, quantize, group_size, delta_tolerance,
         overwrite, trust_remote_code):
    """Fold adapters into the base and save a model dir that mlx_lm.load serves."""
    from mlx_lora.fuse import fuse as run_fuse

    result = run_fuse(model, adapter_path, save_path, dequantize=dequantize, quantize=quantize,
                      group_size=group_size, tolerance=delta_tolerance, overwrite=overwrite,
                      trust_remote_code=trust_remote_code)
    click.echo(f"fused model saved to {result.save_path}")


@cli.command(name="eval")
@model_option
@click.option("--adapter-path", default=None, help="Adapter directory (mlx-lm or PEFT).  "
              "[default: none, the base alone]")
@click.option("--data", default=None, help=FIELDS["data"].metadata["help"] + "  [default: "
              "none; needs --general-data then]")
@options(TrainConfig, names=(*HUB_KEYS, *FEATURES))
@options(EvalConfig)
@options(TrainConfig, names=("general_data",))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last "
              "line of stdout (everything else on stderr).  [default: off]")
@remote_code_option
def eval_command(model, adapter_path, data, split, generate, max_seq_length, batch_size,
                 mask_prompt, general_data, as_json, trust_remote_code, **data_keys):
    """Loss, perplexity and (with --generate) exact-match accuracy on a data split; with
    --general-data, the base's and the adapted model's loss on general text (forgetting)."""
    import json
    import sys

    from mlx_lora.api import Finetune
    from mlx_lora.data.hub import is_hub_data
    from mlx_lora.data.sources import split_file
    from mlx_lora.forgetting import general_text_file

    if not data and not general_data:
        raise UserError("eval needs --data (a split to evaluate), --general-data (the "
                        "forgetting probe on general text), or both")
    # A missing split or general-text file fails before the model loads.
    if data:
        data_file = f"{data}:{split}" if is_hub_data(data) else split_file(data, split)
    if general_data:
        general_text_file(general_data)
    run = Finetune(model, data, adapter_path=adapter_path, max_seq_length=max_seq_length,
                   batch_size=batch_size, mask_prompt=mask_prompt,
                   trust_remote_code=trust_remote_code, **data_keys)
    result, lines = {}, []
    if data:
        result = run.evaluate(split, generate=generate)
        lines += _split_lines(data_file, result)
    if general_data:
        result.update(run.forgetting(general_data))
        lines.append(_forgetting_line(general_data, result))
    for line in lines:
        click.echo(line, err=as_json)
    if as_json:
        sys.stderr.flush()
        click.echo(json.dumps(result))


def _split_lines(data_file, result: dict) -> list[str]:
    lines = [f"{data_file}: loss {result['loss']:.4f}, perplexity "
             f"{result['perplexity']:.3f} over {result['tokens']:,} tokens of "
             f"{result['records']} records"]
    if "accuracy" in result:
        lines.append(f"exact match: {result['accuracy']:.1%} of {result['generated']} "
                     "generations")
    return lines


def _forgetting_line(general_data: str, result: dict) -> str:
    return (f"general text ({general_data}): loss {result['general_loss']:.4f} adapted vs "
            f"{result['general_loss_base']:.4f} base ({result['general_loss_increase']:+.1%}) "
            f"over {result['general_tokens']:,} tokens")


@cli.command()
@click.option("--adapter-path", "--adapter", "adapter_path",
              default=FIELDS["adapter_path"].default, show_default=True,
              help="Adapter directory to convert (mlx-lm or PEFT).")
@options(ExportConfig)
@click.option("--save-path", "--output", "save_path", required=True,
              help="Directory to write the converted adapter (peft, mlx-lm), or the .gguf file "
                   "(gguf).")
@click.option("--model", default=None, help="gguf: the base model (directory or Hub id) whose "
              "config.json gives the architecture and head counts.  [default: the one the "
              "adapter names]")
def export(adapter_path, format, outtype, save_path, model):
    """Convert an adapter to Hugging Face PEFT's format, llama.cpp's LoRA GGUF (over the
    base's GGUF), or a PEFT one to mlx-lm's."""
    from mlx_lora.formats.convert import export_adapter

    source = export_adapter(adapter_path, format, save_path, outtype=outtype, model=model)
    click.echo(f"converted {adapter_path} ({source}) to {format} in {save_path}")


@cli.command(name="import")
@click.option("--adapter-path", required=True, help="A PEFT adapter directory.")
@click.option("--save-path", required=True, help="Directory for the mlx-lm adapter.")
def import_command(adapter_path, save_path):
    """Convert a Hugging Face PEFT adapter to mlx-lm's format (same as export --format mlx-lm)."""
    from mlx_lora.formats.convert import export_adapter

    export_adapter(adapter_path, "mlx-lm", save_path)
    click.echo(f"converted {adapter_path} (peft) to mlx-lm in {save_path}")


@cli.command()
def env():
    """Show what mlx-lora computes on: versions, device, and float32 matmul speed."""
    import platform

    import mlx.core as mx
    import mlx_lm

    from mlx_lora import __version__
    from mlx_lora.model.blas import matmul_gflops, slow_blas_warning

    click.echo(f"mlx-lora {__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
               f"Python {platform.python_version()} on {platform.system()} "
               f"{platform.machine()}")
    click.echo(f"device: {mx.default_device()}; float32 matmul: {matmul_gflops():.1f} GFLOP/s")
    click.echo(slow_blas_warning() or "BLAS: fast")


def main() -> None:
    """Console entry point: on Linux, first with a fast system BLAS preloaded if there is one."""
    import sys

    from mlx_lora.model.blas import preload_fast_blas

    preload_fast_blas(sys.argv[1:])
    cli.main(prog_name="mlx-lora")
