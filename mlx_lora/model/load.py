"""Load a frozen base model (Hub id or local dir) through mlx-lm, fixing what it misreads."""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer
from safetensors import safe_open

from mlx_lora.config import DEFAULTS
from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.model.quantize import is_quantized, quantize_base

# mlx-lm's own download patterns, so a Hub model arrives as mlx_lm.load would fetch it.
ALLOW_PATTERNS = getattr(
    mlx_lm.utils,
    "DEFAULT_ALLOW_PATTERNS",
    ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model",
     "*.txt", "*.jsonl", "*.jinja"],
)
WEIGHTS_GLOB = "model*.safetensors"  # the only weight files mlx-lm's load_model reads
WEIGHT_PATTERNS = ("model*.safetensors", "*.py")  # what the tokenizer and data checks do not need
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Output heads named otherwise than lm_head, only at the top level (internlm2, gpt-neox).
OTHER_HEADS = ("output.weight", "embed_out.weight")


@dataclass
class LoadedModel:
    """A frozen base model, its tokenizer and the config it was built from."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict
    model_path: Path | None  # None for a model handed over already loaded
    quantization: dict | None = None


def resolve_model_path(model: str, trust_remote_code: bool = False,
                       weights: bool = True) -> Path:
    """A local model directory, or a Hub repo id downloaded with mlx-lm's patterns.

    weights=False fetches only what the tokenizer needs (config, tokenizer files), so data
    can be checked before a multi-GB download.
    """
    path = Path(model).expanduser()
    if path.exists():
        return _check_model_dir(path, str(path))
    if model.startswith((".", "/", "~")) or "\\" in model:
        raise UserError(f"{model}: no such directory (expected a model directory or a Hub repo id)")
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UserError(
            f"{model!r} is neither an existing directory nor a Hugging Face repo id "
            "(like Qwen/Qwen2.5-0.5B-Instruct)"
        ) from None
    downloaded = _download(model, trust_remote_code, weights)
    return _check_model_dir(downloaded, f"Hub repo {model}") if weights else downloaded


def _download(repo_id: str, trust_remote_code: bool, weights: bool) -> Path:
    # A model's own .py files are fetched only when they may run.
    patterns = [p for p in ALLOW_PATTERNS if (trust_remote_code or p != "*.py")
                and (weights or p not in WEIGHT_PATTERNS)]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its terms on huggingface.co and run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{repo_id}: no such repo on the Hugging Face Hub (or it is private: `hf auth login`)"
        ) from None
    except Exception as e:  # network, offline mode, disk: all the user's to fix
        raise UserError(
            f"could not download {repo_id} from the Hugging Face Hub (offline? {e}); "
            "pass a local model directory instead"
        ) from None


def _check_model_dir(path: Path, source: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{source} is a file; pass the directory that holds config.json")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not list(path.glob(WEIGHTS_GLOB)):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not missing:
            raise UserError(
                f"{source} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); "
                "mlx_lora loads safetensors only, never pickle: re-save it with transformers' "
                "save_pretrained(..., safe_serialization=True) or use a safetensors revision"
            )
        others = sorted(p.name for p in path.glob("*.safetensors"))
        found = f" (found {', '.join(others[:3])})" if others else ""
        missing.append(f"{WEIGHTS_GLOB} weights{found}")
    if missing:
        raise UserError(f"{source} is not a model directory: no {' and no '.join(missing)}")
    return path


def config_fixes(model_path: Path) -> dict:
    """Config keys to override where mlx-lm misreads a transformers-5 config.json."""
    config = _read_config(model_path)
    names: list[str] = []
    if _lacks_tie(config) or _lacks_tie(config.get("text_config")):
        names = _tensor_names(model_path)
    fixes = _fixes(config, names)
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and (text_fixes := _fixes(text_config, names)):
        fixes["text_config"] = {**text_config, **text_fixes}  # load_model updates shallowly
    return fixes


def _lacks_tie(config) -> bool:
    return isinstance(config, dict) and "tie_word_embeddings" not in config


def _fixes(config: dict, tensor_names: list[str]) -> dict:
    fixes = {}
    # transformers 5 moved rope_theta (and the scaling) into rope_parameters; mlx-lm's model
    # classes read rope_theta / rope_scaling and would silently use their default base.
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        if "rope_theta" not in config:
            fixes["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
            fixes["rope_scaling"] = rope
    # transformers omits tie_word_embeddings when it equals the class default (False for
    # llama); mlx-lm's classes default to True and then drop the real lm_head.weight.
    if _lacks_tie(config):
        fixes["tie_word_embeddings"] = not any(
            n == "lm_head.weight" or n.endswith(".lm_head.weight") or n in OTHER_HEADS
            for n in tensor_names
        )
    return fixes


def _read_config(model_path: Path) -> dict:
    try:
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{model_path / 'config.json'}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{model_path / 'config.json'}: expected a JSON object")
    return config


def _tensor_names(model_path: Path) -> list[str]:
    """Tensor names from the index or the safetensors headers, without reading any data."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    names = []
    for file in sorted(model_path.glob(WEIGHTS_GLOB)):
        with safe_open(str(file), framework="numpy") as f:
            names.extend(f.keys())
    return names


def load_base(model: str, *, quantize: int = 0, group_size: int = DEFAULTS.group_size,
              trust_remote_code: bool = False,
              tokenizer: TokenizerWrapper | None = None) -> LoadedModel:
    """Load a base through mlx-lm (config fixed, quantized if asked) and freeze it.

    `tokenizer`: one already loaded with load_tokenizer_only, to use instead of loading again.
    """
    path = resolve_model_path(model, trust_remote_code)
    net, config = _load_model(path, trust_remote_code)
    tokenizer = tokenizer or _load_tokenizer(path, config)
    return frozen_base(net, tokenizer, config, path, quantize, group_size, model)


def frozen_base(net: nn.Module, tokenizer, config: dict, path: Path | None, quantize: int,
                group_size: int, name: str) -> LoadedModel:
    """A model and tokenizer as a LoadedModel: quantized if asked (and not already), frozen."""
    if not isinstance(tokenizer, TokenizerWrapper):  # a plain Hugging Face tokenizer
        tokenizer = TokenizerWrapper(tokenizer)
    check_base(net, tokenizer, name)
    quantization = is_quantized(net)
    if quantization is not None:
        quantization = {"mode": "affine", **config.get("quantization", quantization)}
        if quantize:
            status(f"note: {name} is already quantized at {quantization['bits']} bits "
                   f"(group size {quantization['group_size']}); keeping it as it is")
    elif quantize:
        quantization = quantize_base(net, quantize, group_size)
        # Recorded as mlx-lm's save_config would, so a saved copy reloads the same layers.
        config = {**config, "quantization": quantization, "quantization_config": quantization}
    net.freeze()
    return LoadedModel(net, tokenizer, config, path, quantization)


def vocab_rows(net: nn.Module) -> int | None:
    """Rows of the model's input embedding: the ids it can take."""
    embed = getattr(getattr(net, "model", None), "embed_tokens", None)
    if isinstance(embed, nn.Module) and "weight" in embed:
        return int(embed.weight.shape[0])
    return getattr(getattr(net, "args", None), "vocab_size", None)


def check_base(net: nn.Module, tokenizer: TokenizerWrapper, name: str) -> None:
    """Refuse a base that cannot train: weights holding NaN or infinity, or a tokenizer with
    ids past the model's embedding. Caught here, not blamed on the learning rate later."""
    for path, value in tree_flatten(net.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
            raise UserError(f"{name}: weight '{path}' holds NaN or infinite values; the "
                            "checkpoint is damaged (download or convert it again)")
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    rows, size = vocab_rows(net), len(inner) if hasattr(inner, "__len__") else None
    if rows is not None and size is not None and size > rows:
        raise UserError(f"{name}: the tokenizer has {size:,} tokens but the model's embedding "
                        f"has {rows:,} rows, so ids from {rows:,} up index past it; the "
                        "tokenizer does not belong to this model")


def load_tokenizer_only(model: str, trust_remote_code: bool = False) -> TokenizerWrapper:
    """The tokenizer of a model (directory or Hub id), without loading (or fetching) weights."""
    path = resolve_model_path(model, trust_remote_code, weights=False)
    return _load_tokenizer(path, _read_config(path))


def context_length(model: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), if it says."""
    config = _read_config(resolve_model_path(model, trust_remote_code, weights=False))
    length = config.get("max_position_embeddings",
                        (config.get("text_config") or {}).get("max_position_embeddings"))
    return length if isinstance(length, int) else None


def _load_model(path: Path, trust_remote_code: bool) -> tuple[nn.Module, dict]:
    fixes = config_fixes(path)
    model_type = _read_config(path).get("model_type")
    try:
        return load_model(path, model_config=fixes, trust_remote_code=trust_remote_code)
    except KeyError as e:
        what = "no model_type" if e.args == ("model_type",) else f"no {e} (needed by {model_type})"
        raise UserError(f"{path / 'config.json'}: {what}") from None
    except TypeError as e:  # the model's ModelArgs lacks a required field
        raise UserError(f"{path / 'config.json'}: incomplete for {model_type}: {e}") from None
    except FileNotFoundError as e:
        raise UserError(f"{path}: {e}") from None
    except ValueError as e:
        message = str(e)
        if "not supported" in message:
            raise UserError(
                f"{path}: model_type {model_type!r} is not supported by mlx-lm "
                f"{mlx_lm.__version__} (try `pip install -U mlx-lm`)"
            ) from None
        if "trust_remote_code" in message:
            raise UserError(f"{message} (mlx-lora: --trust-remote-code)") from None
        raise UserError(f"{path}: the weights do not match config.json: {message}") from None


def _load_tokenizer(path: Path, config: dict) -> TokenizerWrapper:
    try:
        return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"{path}: cannot load the tokenizer ({e}); the directory needs tokenizer.json and "
            "tokenizer_config.json (or tokenizer.model)"
        ) from None
