"""The Python API: a fine-tuning job in the CLI's vocabulary (every keyword is a flag's name).

    run = mlx_lora.Finetune(model="Qwen/Qwen2.5-0.5B-Instruct", data="data/",
                            adapter_path="out", iters=200, batch_size=4, mask_prompt=True)
    result = run.train(callback=on_event, stop=threading_event)
    metrics = run.evaluate(split="test")
    probe = run.forgetting("builtin")  # loss on general text: base vs adapted
    text = run.generate("prompt", max_tokens=50)
    mlx_lora.export("out", "adapter.gguf", format="gguf")  # or "peft"; as `mlx-lora export`
"""

import os
from pathlib import Path

from mlx_lora.config import (
    ALIASES,
    FIELDS,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    build_config,
    features,
    hub_splits,
    unknown_key,
)
from mlx_lora.config_file import read_config_file
from mlx_lora.data.hub import is_hub_data, read_hub_splits
from mlx_lora.data.records import read_records
from mlx_lora.data.sources import read_splits, split_file
from mlx_lora.errors import UserError
from mlx_lora.evaluate import evaluate_records
from mlx_lora.forgetting import BUILTIN, measure_forgetting, read_general
from mlx_lora.formats.convert import export_adapter
from mlx_lora.generate import complete
from mlx_lora.model.adapted import adapt_for_inference, load_adapted
from mlx_lora.model.load import LoadedModel, frozen_base
from mlx_lora.train.report import Callback
from mlx_lora.train.run import TrainResult, train

GIVEN_MODEL = "(a model given in memory)"
GIVEN_DATA = "(records given in memory)"
EVAL, GENERATE, EXPORT = EvalConfig(), GenerateConfig(), ExportConfig()


class Finetune:
    """A fine-tuning job: train() it, then evaluate() and generate() with the result.

    model: a Hub id or directory, or an already-loaded (model, tokenizer) pair. data: a
    directory or .jsonl/.txt file, a list of records (dicts in any supported format), or a
    dict of splits {"train": [...], "valid": [...]}. config: a YAML/JSON file as --config;
    the keywords override it. adapter_path=None evaluates and generates with the base alone.
    Bad input raises UserError with the CLI's one-line message.
    """

    def __init__(self, model=None, data=None, *, config: str | None = None,
                 resume: bool = False, overwrite: bool = False, **options):
        options = {ALIASES.get(key, key): value for key, value in options.items()}
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise UserError(f"Finetune: {unknown_key(unknown[0])}")
        self._base = model if isinstance(model, tuple) else None
        self._records = None if data is None or isinstance(data, (str, os.PathLike)) else data
        self._no_adapter = "adapter_path" in options and options["adapter_path"] is None
        names = {"model": GIVEN_MODEL if self._base else _text(model),
                 "data": GIVEN_DATA if self._records is not None else _text(data)}
        file_values = read_config_file(config) if config else {}
        self.config = build_config(file_values, {**options, **names},
                                   config or "Finetune()")
        self.resume, self.overwrite = resume, overwrite
        self._loaded: LoadedModel | None = None

    def train(self, callback: Callback | None = None, stop=None) -> TrainResult:
        """Train; returns when done, or after the current step once `stop` (an Event) is set.

        callback gets every metrics.jsonl event as a dict with the same keys.
        """
        for key in ("model", "data"):
            if not getattr(self.config, key):
                raise UserError(f"--{key} is required (on the command line or in --config)")
        result = train(self.config, self.resume, self.overwrite, data=self._records,
                       base=self._base, callback=callback, stop=stop)
        self._loaded = result.loaded
        return result

    def evaluate(self, split: str = EVAL.split, generate: int = EVAL.generate) -> dict:
        """Loss, perplexity (and with generate=N, exact-match accuracy) on a split."""
        name, records = self._split_records(split)
        config = self.config
        result = evaluate_records(self.model(), records, name, split=split,
                                  batch_size=config.batch_size,
                                  max_seq_length=config.max_seq_length,
                                  mask_prompt=config.mask_prompt, generate=generate)
        return result.to_dict()

    def forgetting(self, general_data: str | None = None) -> dict:
        """The forgetting probe: general_loss_base, general_loss (adapted), their relative
        increase general_loss_increase, and general_tokens, on general text: a .txt/.jsonl/.json
        file or "builtin" (None: the config's general_data, else builtin)."""
        name, records = read_general(general_data or self.config.general_data or BUILTIN)
        config = self.config
        return measure_forgetting(self.model(), name, records, config.batch_size,
                                  config.max_seq_length)

    def generate(self, prompt: str, max_tokens: int = GENERATE.max_tokens,
                 temp: float = GENERATE.temp, chat: bool = GENERATE.chat) -> str:
        """A completion of `prompt` by the trained (or saved) model; greedy at temp 0."""
        return complete(self.model(), prompt, max_tokens, temp, chat)

    def model(self) -> LoadedModel:
        """The model evaluate() and generate() use: the one trained here, else the base with
        the adapters saved in adapter_path (None: the base alone), in eval mode."""
        if self._loaded is None:
            self._loaded = self._load_for_inference()
        return self._loaded

    def _load_for_inference(self) -> LoadedModel:
        config = self.config
        adapter_dir = None if self._no_adapter else Path(config.adapter_path)
        if self._base is None:
            return load_adapted(config.model, adapter_dir and str(adapter_dir),
                                config.trust_remote_code)[0]
        loaded = frozen_base(*self._base, {}, None, config.quantize, config.group_size,
                             GIVEN_MODEL)
        adapt_for_inference(loaded, adapter_dir and str(adapter_dir))
        return loaded

    def _split_records(self, split: str) -> tuple[str, list]:
        config = self.config
        if self._records is None:
            if not config.data:
                raise UserError("--data is required to evaluate")
            if is_hub_data(config.data):
                splits = read_hub_splits(config.data, hub_splits(config), features(config),
                                         wanted=(split,))
                if split in splits:
                    return splits[split]
                raise UserError(f"{config.data}: no {split} split; name one with --{split}-split")
            data_file = split_file(config.data, split)
            return str(data_file), read_records(data_file, features(config))
        splits = read_splits(self._records, features(config))
        if split not in splits:
            raise UserError(f"data: no '{split}' split (it has: {', '.join(sorted(splits))})")
        return splits[split]


def export(adapter_path, save_path, format: str = EXPORT.format, *,
           outtype: str = EXPORT.outtype, model: str | None = None) -> str:
    """`mlx-lora export`: write adapter_path's adapter as format ("peft", "mlx-lm" or "gguf",
    a file) to save_path; returns the adapter's own format."""
    return export_adapter(adapter_path, format, save_path, outtype=outtype, model=model)


def _text(value):
    """A path given as a Path, as the string the config holds; anything else as it is."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value
