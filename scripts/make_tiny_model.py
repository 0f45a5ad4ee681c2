"""Write a tiny random llama/qwen2 model dir with a trained tokenizer (tests, demos, benches)."""

from pathlib import Path

import click

from mlx_lora.demo.tiny import make_tiny_model


@click.command(context_settings={"show_default": True})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(["llama", "qwen2"]), default="llama")
@click.option("--vocab-size", default=512, help="Ignored with --tokenizer-dir (taken from it).")
@click.option("--hidden-size", default=64)
@click.option("--num-layers", default=2)
@click.option("--num-heads", default=4)
@click.option("--num-kv-heads", default=2)
@click.option("--intermediate-size", default=128)
@click.option("--tie-word-embeddings/--no-tie-word-embeddings", default=False)
@click.option(
    "--texts", "texts_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None, help="Train the tokenizer on this text file (one text per line).",
)
@click.option(
    "--tokenizer-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None, help="Copy this model's tokenizer instead of training one.",
)
@click.option("--seed", default=0)
def main(out_dir, texts_file, **options):
    """Write a tiny random model to OUT_DIR and print its path."""
    texts = None
    if texts_file is not None:
        texts = [line for line in texts_file.read_text(encoding="utf-8").splitlines() if line]
    click.echo(make_tiny_model(out_dir, texts=texts, **options))


if __name__ == "__main__":
    main()
