"""The `mlx-lora` command line: train, generate, demo (and more as they land)."""

import dataclasses

import click

from mlx_lora.config import TrainConfig, build_config, read_config_file
from mlx_lora.errors import UserError


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


def main() -> None:
    """Console entry point."""
    cli.main(prog_name="mlx-lora")

