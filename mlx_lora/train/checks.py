"""What a run checks before it loads any weights: a resume's settings, the chat template, and
the settings that deserve a warning."""

import dataclasses
from pathlib import Path

from jinja2 import TemplateSyntaxError

from mlx_lora.adapters import METHODS
from mlx_lora.config import DEFAULTS, TrainConfig, to_dict
from mlx_lora.data.template import has_chat_template
from mlx_lora.errors import UserError
from mlx_lora.formats.run_config import RUN_CONFIG_FILE, changed_settings, read_run_config

# Settings a resumed run must share with the run it continues: they define the adapters, the
# data and the batches; the rest (iters, learning-rate schedule, cadence) may change.
RESUME_KEYS = ("model", "data", "train_mode", "fine_tune_type", "rank", "alpha", "rslora",
               "dropout", "targets", "lora_plus_ratio", "train_embeddings", "init",
               "num_layers", "quantize", "group_size", "mask_prompt", "max_seq_length",
               "batch_size", "grad_accumulation_steps", "seed", "prompt_feature",
               "completion_feature", "text_feature", "chat_feature", "valid_fraction",
               "dataset_config", "train_split", "valid_split", "test_split",
               "adapter_variant", "adapter_size", "num_virtual_tokens", "prompt_init_text")
# Settings whose empty value means the method's default, which a run resolves and records.
RESOLVED = ("targets", "adapter_size")
PROBE_ANSWER = "mlx-lora-probe-answer"


def check_resume(adapter_dir: Path, config: TrainConfig) -> None:
    """Refuse a --resume whose settings differ from the run it continues, naming them."""
    changed = changed_settings(adapter_dir, to_dict(config), RESUME_KEYS)
    previous = (read_run_config(adapter_dir) or {}).get("optimizer", config.optimizer)
    if str(previous).endswith("-8bit") != config.optimizer.endswith("-8bit"):
        changed.append(f"optimizer {previous!r} -> {config.optimizer!r} (8-bit and 32-bit "
                       "Adam keep their state in other forms)")
    if changed:
        raise UserError(
            f"{adapter_dir}: --resume continues a run with other settings ({'; '.join(changed)} "
            f"against its {RUN_CONFIG_FILE}); use that run's settings, or start a new run in "
            "another --adapter-path (or here with --overwrite)")


def check_ranks(config: TrainConfig, n_ranks: int) -> None:
    """Refuse a batch too small to give each of several processes a share of it."""
    if config.batch_size < n_ranks:
        raise UserError(f"--batch-size {config.batch_size} is the batch of all {n_ranks} "
                        f"processes together, and each reads its share of it: use --batch-size "
                        f"{n_ranks} or more")


def with_run_defaults(adapter_dir: Path, config: TrainConfig) -> TrainConfig:
    """`config`, its unset targets and adapter size (the method's defaults) taken as the run in
    `adapter_dir` resolved them: a resumed run continues with that run's modules."""
    previous = read_run_config(adapter_dir) or {}
    resolved = {key: previous[key] for key in RESOLVED if not getattr(config, key)
                and previous.get(key) and type(previous[key]) is type(getattr(config, key))}
    return dataclasses.replace(config, **resolved)


def check_method(config: TrainConfig) -> None:
    """Refuse settings the method cannot honor, before any weights load."""
    method = config.fine_tune_type
    table = METHODS[method]
    _check_virtual(config, method, table.virtual is not None)
    if config.attention in ("blockwise", "causal-blocks") and (why := blockwise_ruled_out(config)):
        raise UserError(f"--attention {config.attention} calls attention block by block, but "
                        f"{why}; use --attention auto or fused")
    if table.place is None and (config.adapter_size or
                                config.adapter_variant != DEFAULTS.adapter_variant):
        raise UserError("--adapter-size and --adapter-variant shape bottleneck adapters; use "
                        "them with --fine-tune-type adapter")
    if table.place is not None and config.targets:
        raise UserError(f"--targets picks linear layers; {method} goes where --adapter-variant "
                        "says (pick the blocks with --num-layers): drop --targets")
    if config.init != "default" and not (table.low_rank and table.own_weights is None):
        raise UserError(f"--init {config.init} sets how lora_a and lora_b start, which {method} "
                        "does not have; use it with lora or dora")
    if table.own_weights is None:
        if config.train_embeddings:
            raise UserError(f"--train-embeddings trains weights in place, which {method} "
                            "adapter files cannot hold; use it with --fine-tune-type full")
        if not table.low_rank and (config.dropout or config.lora_plus_ratio):
            raise UserError(f"--dropout and --lora-plus-ratio act on LoRA's factors, which "
                            f"{method} does not have; drop them")
        return
    if config.quantize:
        raise UserError(f"--fine-tune-type {method} trains the base's own weights, which "
                        "--quantize would make integers; drop --quantize (QLoRA is lora/dora)")
    if config.targets not in ("", "all-linear"):
        raise UserError(f"--targets picks layers for an adapter to wrap; {method} trains whole "
                        "blocks (pick them with --num-layers): drop --targets "
                        "(and lora_parameters.keys from an mlx-lm config)")
    if config.lora_plus_ratio:
        raise UserError(f"--lora-plus-ratio speeds up lora_b, which {method} does not have; "
                        "drop it")


def blockwise_ruled_out(config: TrainConfig) -> str | None:
    """Why the method or its settings rule attention in blocks (blockwise, causal-blocks) out,
    or None."""
    if METHODS[config.fine_tune_type].virtual is not None:
        return f"{config.fine_tune_type} tuning's virtual keys reach attention through its cache"
    if config.dropout:
        return (f"--dropout {config.dropout} would draw other masks in blocks (and in a "
                "recomputed block) than in the plain call")
    return None


def _check_virtual(config: TrainConfig, method: str, virtual: bool) -> None:
    """Refuse what prompt and prefix tuning cannot honor, and their settings elsewhere."""
    if not virtual:
        if config.prompt_init_text:
            raise UserError("--prompt-init-text sets how virtual tokens start; use it with "
                            "--fine-tune-type prompt or prefix")
        return
    if config.targets or config.num_layers != -1:
        raise UserError(f"--targets and --num-layers pick layers to adapt; {method} tuning puts "
                        "its virtual tokens before the input of every layer: drop them")
    if config.grad_checkpoint:
        # mx.checkpoint passes no gradient to arrays a block reads from its cache argument.
        raise UserError(f"--grad-checkpoint would drop the gradient of {method} tuning's virtual "
                        "tokens (they reach each block through its cache); drop it")


def check_template(tokenizer, kinds: set[str], model: str) -> None:
    """Refuse a chat template with a syntax error, or one that drops assistant turns; kinds:
    the records' (a preference pair's as its halves')."""
    if not kinds & {"chat", "completion"}:
        return
    if not has_chat_template(tokenizer):
        return
    messages = [{"role": "user", "content": "Say the word."},
                {"role": "assistant", "content": PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateSyntaxError as e:
        raise UserError(f"{model}: the chat template (chat_template.jinja or tokenizer_config."
                        f"json) has a syntax error at its line {e.lineno}: {e.message}") from None
    except Exception:  # noqa: BLE001 (a template may refuse this probe; the records tell more)
        return
    if PROBE_ANSWER not in text:
        raise UserError(f"{model}: the chat template drops assistant turns (a probe answer does "
                        "not appear in its output), so training would learn from the wrong "
                        "text; use the model's own template or an instruct model")


def warnings(config: TrainConfig, tokenizer, kinds: set[str],
             context_length: int | None) -> list[str]:
    """One line for each setting that trains, but probably not as the user meant."""
    lines = []
    if tokenizer.eos_token_id is None:
        lines.append("warning: the tokenizer has no end-of-sequence token, so the model will "
                     "not learn where an answer ends")
    if "completion" in kinds and not has_chat_template(tokenizer):
        lines.append("warning: the tokenizer has no chat template, so each prompt and "
                     "completion are joined with nothing between them; end the prompts with a "
                     "separator (a newline, say) or use an instruct model")
    if context_length and config.max_seq_length > context_length:
        lines.append(f"warning: --max-seq-length {config.max_seq_length} is beyond the "
                     f"model's context of {context_length} tokens; longer records will train "
                     "positions the model has never seen")
    return lines
