"""Every command's options and their defaults, stated once; the training config's file and flags."""

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from mlx_lora.data.hub import HubSplits
from mlx_lora.errors import UserError
from mlx_lora.train.trackers import services


def _opt(default, help_text, **meta):
    return field(default=default, metadata={"help": help_text, **meta})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; field names are the config keys and the CLI flags."""

    model: str = _opt("", "Base model: a Hugging Face repo id or a local directory.")
    data: str = _opt("", "Directory with train.jsonl [valid.jsonl test.jsonl], one .jsonl/.json/"
                     ".txt file, or a Hugging Face data set (org/name, or a local copy).")
    dataset_config: str = _opt("", "A Hugging Face data set's configuration (subset), e.g. "
                               "main for openai/gsm8k.")
    train_split: str = _opt("train", "A Hugging Face data set's training split; slices too: "
                            "train[:90%].", aliases=("dataset_train_split",))
    valid_split: str = _opt("", "Its validation split; empty = validation, valid, val or dev "
                            "when it has one.")
    test_split: str = _opt("", "Its test split; empty = test when it has one.",
                           aliases=("dataset_test_split",))
    adapter_path: str = _opt("adapters", "Output directory for adapters, metrics and checkpoints.")
    quantize: int = _opt(0, "Quantize the frozen base to 4 or 8 bits on load (QLoRA); 0 = no.")
    group_size: int = _opt(64, "Quantization group size.")
    qlora_matmul: str = _opt(
        "auto", "How a quantized base's frozen layers multiply in training: quantized (MLX's "
        "quantized matmul), dequantize (the weight dequantized on the fly for a float matmul, "
        "never kept), or auto (each layer shape timed both ways at the run's token count; the "
        "faster wins).", choices=("auto", "quantized", "dequantize"))
    trust_remote_code: bool = _opt(False, "Allow a model's own Python code to run on load.")
    train_mode: str = _opt(
        "sft", "Objective: sft (supervised), or dpo / orpo on {prompt, chosen, rejected} pairs.",
        choices=("sft", "dpo", "orpo"))
    beta: float = _opt(0.1, "DPO: how far the policy may move from the reference (KL weight).")
    dpo_loss_type: str = _opt("sigmoid", "DPO's loss of the reward margin.",
                              choices=("sigmoid", "ipo", "hinge"), aliases=("dpo_cpo_loss_type",))
    orpo_lambda: float = _opt(
        -1.0, "ORPO: weight of the odds-ratio term; -1 = --beta (as TRL and mlx-lm-lora use it).")
    fine_tune_type: str = _opt("lora", "Adapter method: lora, or dora (LoRA with a learned "
                               "magnitude per output row), or ia3 (learned scales of the keys, "
                               "values and feed-forward input, as PEFT's IA3; no rank), or full "
                               "(every weight of the last num-layers blocks trains; float bases "
                               "only), or adapter (bottleneck adapters, AdapterHub's: see "
                               "--adapter-variant), or prompt (prompt tuning: learned input "
                               "embeddings before every sequence), or prefix (prefix tuning: "
                               "learned keys and values before every sequence at each layer); "
                               "prompt and prefix cannot be fused.",
                               choices=("lora", "dora", "ia3", "full", "adapter", "prompt",
                                        "prefix"),
                               aliases=("train_type",))
    num_virtual_tokens: int = _opt(20, "Prompt and prefix tuning: the virtual tokens put "
                                   "before every sequence.")
    prompt_init_text: str = _opt(
        "", "Prompt and prefix tuning: the virtual tokens start as this text's tokens, repeated "
        "or cut to num-virtual-tokens (PEFT's TEXT init); empty = random tokens of the "
        "vocabulary.")
    rank: int = _opt(8, "LoRA rank r.")
    alpha: float = _opt(16.0, "LoRA alpha; scale = alpha / rank (alpha / sqrt(rank) with rslora).")
    rslora: bool = _opt(False, "Rank-stabilized scale alpha / sqrt(rank).")
    dropout: float = _opt(0.0, "Dropout on the adapter input.")
    lora_plus_ratio: float = _opt(
        0.0, "LoRA+: lora_b learns this many times faster than lora_a; 0 = off (plain LoRA).")
    init: str = _opt(
        "default", "How lora/dora factors start: default (lora_b zero) or pissa (PiSSA: from "
        "the top-rank SVD of each target weight, the frozen base being the rest of it; the SVD "
        "runs on the CPU, minutes for a large model). PiSSA saves the LoRA of twice the rank "
        "it equals on the unmodified base.", choices=("default", "pissa"))
    targets: str = _opt(
        "", "Modules to adapt: names (q_proj,v_proj), 're:REGEX' on full paths, or all-linear; "
        "empty = the method's default: all-linear, for ia3 PEFT's modules for the model type "
        "(k_proj,v_proj,down_proj on llama).")
    num_layers: int = _opt(-1, "Adapt only the last N transformer blocks; -1 = all.")
    adapter_variant: str = _opt(
        "pfeiffer", "Bottleneck adapters (fine-tune-type adapter), as AdapterHub names them: "
        "pfeiffer (SeqBnConfig: one after each block, on the residual stream, relu) or houlsby "
        "(DoubleSeqBnConfig: after each block's attention and feed-forward outputs, swish).",
        choices=("pfeiffer", "houlsby"))
    adapter_size: int = _opt(
        0, "Bottleneck adapters: the bottleneck's width; 0 = the model's hidden size / 16 "
        "(AdapterHub's reduction factor 16).")
    train_embeddings: bool = _opt(
        False, "Full fine-tuning: also train the weights outside the blocks (token embeddings, "
        "final norm, output head).")
    max_seq_length: int = _opt(2048, "Longer records are truncated to this many tokens.")
    mask_prompt: bool = _opt(False, "Train only on completions / every assistant turn.")
    batch_size: int = _opt(4, "Records per micro-batch; on several processes (mlx.launch), per "
                           "micro-batch of them all, each reading its share.")
    pack: bool = _opt(
        True, "Pack records into rows of up to max-seq-length tokens, each record seeing only "
        "itself (batch-size records per micro-batch on average); skipped, saying why, for a "
        "model where packing would change the loss or data that padding fills as well."
    )
    grad_accumulation_steps: int = _opt(1, "Micro-batches per optimizer update (token-weighted).",
                                        aliases=("gradient_accumulation_steps",))
    iters: int = _opt(1000, "Optimizer updates to run (ignored when epochs is set).")
    epochs: float = _opt(0.0, "Passes over the training set; 0 = use iters.")
    optimizer: str = _opt(
        "adamw", "Optimizer: adam, adamw, or their 8-bit forms adam-8bit, adamw-8bit (moments in "
        "blocks of 256 one-byte codes with a float32 scale each: a quarter of the memory).",
        choices=("adam", "adamw", "adam-8bit", "adamw-8bit"))
    shard_optimizer: bool = _opt(
        False, "On several processes (mlx.launch), each keeps and updates 1/N of the optimizer "
        "state and they all-gather the updated weights (ZeRO stage 1); a single process has "
        "nothing to share it with.")
    learning_rate: float = _opt(1e-4, "Peak learning rate.")
    weight_decay: float = _opt(0.0, "Decoupled weight decay (adamw).")
    adam_beta1: float = _opt(0.9, "Adam's first-moment decay.")
    adam_beta2: float = _opt(0.999, "Adam's second-moment decay.")
    adam_epsilon: float = _opt(1e-8, "Adam's epsilon.")
    bias_correction: bool = _opt(True, "Correct the bias of Adam's moments (as torch does).")
    lr_schedule: str = _opt(
        "constant", "Learning-rate schedule after warmup.", choices=("constant", "cosine", "linear")
    )
    warmup: int = _opt(0, "Linear warmup steps up to the learning rate.")
    warmup_init: float = _opt(0.0, "Learning rate the warmup starts from.")
    decay_steps: int = _opt(0, "Steps of the cosine/linear decay after warmup; 0 = to the end.")
    end_learning_rate: float = _opt(0.0, "Learning rate the decay ends at.")
    max_grad_norm: float = _opt(0.0, "Clip the global gradient norm to this; 0 = no clipping.")
    grad_checkpoint: bool = _opt(False, "Recompute the adapted blocks' activations to save memory.")
    attention: str = _opt(
        "auto", "Attention in training: blockwise computes it in blocks of query rows and "
        "recomputes their scores in the backward, so no layer keeps (heads, L, L) scores; "
        "causal-blocks keeps each block's scores but skips the keys after its last row; fused "
        "is mlx-lm's own; auto, where the backend's fused attention keeps its scores for the "
        "backward (measured once): blockwise for rows of 1024 tokens or more, causal-blocks "
        "from 256; else fused.",
        choices=("auto", "blockwise", "causal-blocks", "fused"))
    memory_limit: float = _opt(
        -1.0, "GB a training step may peak at (MLX's cache and limits are kept under it); a step "
        "past it stops the run with a checkpoint, saying which setting to lower, instead of "
        "swapping. -1 = the GPU's recommended working set (Metal), else 3/4 of the memory; "
        "0 = off.")
    steps_per_report: int = _opt(10, "Log training loss every N updates.")
    report_to: str = _opt("", "Also log the train and val numbers to wandb, tensorboard or both "
                          "(wandb,tensorboard), under the adapter path; empty = neither.")
    project_name: str = _opt("", "The wandb project to log to; empty = the adapter path's name.")
    steps_per_eval: int = _opt(200, "Validation loss every N updates; 0 = only at the end.")
    val_batches: int = _opt(25, "Validation batches per evaluation; -1 = all.")
    valid_fraction: float = _opt(
        0.05, "Without a valid split, hold out this fraction of train (at least one batch, when "
        "that is at most twice the fraction) for validation, chosen by --seed; 0 = never.")
    general_data: str = _opt(
        "", "Forgetting probe: general text (.txt/.jsonl/.json) whose loss is measured at every "
        "evaluation (by eval: the base's and the adapted model's); the bare flag or builtin = "
        "a small set mlx-lora ships; empty = off.", flag_value="builtin")
    save_every: int = _opt(100, "Save adapters and a resume checkpoint every N updates.")
    keep_checkpoints: int = _opt(2, "Resume checkpoints to keep (the newest).")
    early_stopping_patience: int = _opt(
        0, "Stop after N evaluations without a better validation loss; 0 = never.")
    keep_best: bool = _opt(True, "Keep the best-validation adapters in best/ (needs valid data).")
    seed: int = _opt(0, "Random seed for initialization, dropout and shuffling.")
    resume_adapter_file: str = _opt(
        "", "Start from the adapter weights in this .safetensors file (a fresh run otherwise).")
    prompt_feature: str = _opt("prompt", "The records' key holding the prompt.")
    completion_feature: str = _opt("completion", "The records' key holding the completion.")
    text_feature: str = _opt("text", "The records' key holding plain text.")
    chat_feature: str = _opt("messages", "The records' key holding chat messages.")
    clear_cache_threshold: int = _opt(
        0, "Clear MLX's buffer cache after a step when it holds more bytes than this; 0 = never.")
    test: bool = _opt(False, "After training, report the loss on the test split.")
    test_batches: int = _opt(500, "Test batches to evaluate with --test; -1 = all.")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Other tools' names for our keys (mlx-lm-lora's), accepted as flags and config keys.
ALIASES = {alias: f.name for f in FIELDS.values() for alias in f.metadata.get("aliases", ())}
DEFAULTS = TrainConfig()


def _same(name: str):
    """A field that means what TrainConfig's field of that name means, with its default."""
    return _opt(FIELDS[name].default, FIELDS[name].metadata["help"])


@dataclass(frozen=True)
class GenerateConfig:
    """`mlx-lora generate` and the API's generate(): how to sample."""

    max_tokens: int = _opt(100, "Tokens to generate.")
    temp: float = _opt(0.0, "Sampling temperature; 0 = greedy.")
    chat: bool = _opt(True, "Wrap the prompt in the tokenizer's chat template when it has one.")


@dataclass(frozen=True)
class EvalConfig:
    """`mlx-lora eval` and the API's evaluate(): what to measure."""

    split: str = _opt("test", "Which split of --data.")
    generate: int = _opt(0, "Exact-match accuracy of greedy generations on the first N prompt/"
                            "completion or chat records; -1 = all, 0 = none.")
    max_seq_length: int = _same("max_seq_length")
    batch_size: int = _opt(FIELDS["batch_size"].default, "Records per batch for the loss.")
    mask_prompt: bool = _same("mask_prompt")


@dataclass(frozen=True)
class FuseConfig:
    """`mlx-lora fuse`: the fused model's location and precision."""

    save_path: str = _opt("fused_model", "Directory for the fused model.")
    dequantize: bool = _opt(False, "Write a float model (transformers loads it too).")
    quantize: int = _opt(0, "Re-quantize every layer to this many bits; 0 = keep the base's "
                            "precision.")
    group_size: int = _same("group_size")
    delta_tolerance: float = _opt(
        0.1, "Keep an adapted layer of a quantized base at its bits only if its update survives "
             "within this relative error; else 8 bits, else float.")


@dataclass(frozen=True)
class ExportConfig:
    """`mlx-lora export` and the API's export(): the format to write and, for GGUF, its type."""

    format: str = _opt("peft", "Format to write: peft or mlx-lm (a directory), or gguf (a "
                               "llama.cpp LoRA adapter file).", choices=("peft", "mlx-lm", "gguf"))
    outtype: str = _opt("f32", "GGUF tensor type: f32 (as llama.cpp's convert_lora_to_gguf "
                               "writes by default) or f16 (half the size).", choices=("f32", "f16"))


@dataclass(frozen=True)
class ServeConfig:
    """`mlx-lora serve`: where it listens, a request's defaults, and how requests share turns."""

    host: str = _opt("127.0.0.1", "Address to listen on; 0.0.0.0 opens it to the network.")
    port: int = _opt(8080, "Port to listen on; 0 = any free port.")
    max_tokens: int = _opt(512, "Tokens to generate when a request does not say.")
    temp: float = _opt(0.0, "Sampling temperature when a request does not say; 0 = greedy.")
    top_p: float = _opt(1.0, "Nucleus sampling mass when a request does not say; 1 = off.")
    max_concurrent: int = _opt(8, "Requests generating at once, taking turns; more wait in line.")
    turn_tokens: int = _opt(1, "Tokens a request generates per turn before the next one's turn.")
    api_key: str = _opt("", "Require 'Authorization: Bearer KEY' on every request; empty = no "
                            "key (fine on 127.0.0.1).")


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any],
                 source: str) -> TrainConfig:
    """Merge defaults < config file < flags, check types and ranges, and freeze."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    typed = {key: _coerce(key, value, source) for key, value in merged.items()}
    config = TrainConfig(**typed)
    _check_ranges(config, source)
    return config


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = type(FIELDS[key].default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML reads 1e-4 as a string
            value = float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(
            f"{source}: '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    choices = FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_ranges(config: TrainConfig, source: str) -> None:
    positive = ("rank", "batch_size", "grad_accumulation_steps", "group_size", "max_seq_length",
                "steps_per_report", "save_every", "keep_checkpoints", "num_virtual_tokens")
    for key in positive:
        if getattr(config, key) <= 0:
            raise UserError(f"{source}: '{key}' must be positive, got {getattr(config, key)}")
    non_negative = ("iters", "epochs", "learning_rate", "weight_decay", "warmup", "max_grad_norm",
                    "steps_per_eval", "early_stopping_patience", "decay_steps",
                    "end_learning_rate", "warmup_init", "adam_epsilon", "clear_cache_threshold",
                    "lora_plus_ratio", "beta", "adapter_size")
    for key in non_negative:
        if getattr(config, key) < 0:
            raise UserError(f"{source}: '{key}' must not be negative, got {getattr(config, key)}")
    if not 0.0 <= config.dropout < 1.0:
        raise UserError(f"{source}: 'dropout' must be in [0, 1), got {config.dropout}")
    if config.quantize not in (0, 2, 3, 4, 5, 6, 8):
        raise UserError(f"{source}: 'quantize' must be 0 (off), 4 or 8 (or 2, 3, 5, 6 bits)")
    if config.optimizer in ("adam", "adam-8bit") and config.weight_decay:
        raise UserError(f"{source}: weight_decay needs optimizer adamw or adamw-8bit "
                        f"({config.optimizer} has none)")
    if config.num_layers == 0 or config.num_layers < -1:
        raise UserError(f"{source}: 'num_layers' must be -1 (all) or a positive count")
    for key in ("val_batches", "test_batches"):
        if getattr(config, key) == 0 or getattr(config, key) < -1:
            raise UserError(f"{source}: '{key}' must be -1 (all) or a positive count")
    if not 0.0 <= config.valid_fraction < 1.0:
        raise UserError(f"{source}: 'valid_fraction' must be in [0, 1), got "
                        f"{config.valid_fraction}")
    if config.memory_limit < 0 and config.memory_limit != -1:
        raise UserError(f"{source}: 'memory_limit' must be GB, 0 (off) or -1 (a share of the "
                        f"machine's memory), got {config.memory_limit}")
    if config.orpo_lambda < 0 and config.orpo_lambda != -1:
        raise UserError(f"{source}: 'orpo_lambda' must be -1 (use beta) or not negative")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(config, key) < 1.0:
            raise UserError(f"{source}: '{key}' must be in [0, 1), got {getattr(config, key)}")
    services(config.report_to, f"{source}: 'report_to'")


def unknown_key(key: str) -> str:
    """What to say about a key that is no option: the nearest one, and where all are listed."""
    near = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return f"unknown key '{key}' ({hint}the keys are the flags of mlx-lora train --help)"


def features(config: TrainConfig) -> dict[str, str]:
    """Our record key -> the key the user's records hold it under."""
    return {"prompt": config.prompt_feature, "completion": config.completion_feature,
            "text": config.text_feature, "messages": config.chat_feature}


def hub_splits(config: TrainConfig) -> HubSplits:
    """Which splits of a Hugging Face data set the run reads."""
    return HubSplits(config.dataset_config, config.train_split, config.valid_split,
                     config.test_split)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved configuration as plain keys, as written to the adapter directory."""
    return dataclasses.asdict(config)
