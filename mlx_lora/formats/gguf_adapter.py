"""llama.cpp's LoRA adapter GGUF, written from an mlx-lm or a PEFT adapter directory.

llama.cpp adds scale * B @ A to a base tensor W (GGUF numpy layout: W (out, in)), with
`lora_a` A (r, in) and `lora_b` B (out, r) named after W (`blk.3.attn_q.weight.lora_a`) and
scale = alpha / rank (times the user's --lora-scaled factor) read from `adapter.lora.alpha`
(src/llama-adapter.cpp). Ours adds scale * (x @ lora_a) @ lora_b, so A = lora_a.T,
B = lora_b.T and alpha = scale * rank: exact for rsLoRA too. Names come from the `gguf`
package's tensor map, as llama.cpp's converter names the base. For llama-family models its
converter reorders the rows of q_proj and k_proj (RoPE pairs adjacent instead of half a head
apart); the rows of W are the rows of B, so B is reordered the same way.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lora.adapters import METHODS
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.formats import mlx_lm_adapter, peft_adapter
from mlx_lora.formats.atomic import write_atomic
from mlx_lora.formats.output_dir import check_writable

# model_type (mlx-lm's, from config.json) -> (gguf.MODEL_ARCH member, q/k rows reordered).
# From the classes llama.cpp's convert_hf_to_gguf picks for these architectures: LlamaModel
# (also for MistralForCausalLM) reorders; the qwen, gemma and phi3 classes do not, and touch
# only tensors no LoRA adapts (norms +1, embedding rows). phi3's fused qkv_proj and
# gate_up_proj stay fused in GGUF (attn_qkv, ffn_up), so their adapters carry over as they are.
ARCHS = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
    "gemma": ("GEMMA", False),
    "gemma2": ("GEMMA2", False),
    "gemma3": ("GEMMA3", False),
    "gemma3_text": ("GEMMA3", False),
    "phi3": ("PHI3", False),
}
# llama.cpp's converter drops lm_head for these: their GGUF has no output tensor to adapt.
NO_OUTPUT_TENSOR = ("gemma", "gemma2")
OUTTYPES = ("f32", "f16")
INSTALL = "pip install 'mlx-lora[gguf]'"


@dataclass(frozen=True)
class LoraFactors:
    """An adapter directory's LoRA, in our layout, whichever format it was written in."""

    hyper: Hyper
    weights: dict[str, mx.array]  # <module path>.lora_a (in, r) and .lora_b (r, out)
    base: str | None  # the base model it names (directory or Hub id)
    model_type: str | None  # the architecture it says it was trained on, if it says
    source: str  # the config file, for messages


def check_save_path(save_path: Path) -> None:
    """Fail now, in one line, if `save_path` cannot be the GGUF file we write."""
    save_path = Path(save_path)
    if save_path.is_dir():
        raise UserError(f"--save-path {save_path} is a directory; name the .gguf file to write")
    check_writable(save_path.parent, "--save-path's folder")


def import_gguf():
    """The `gguf` package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"--format gguf needs the gguf package: {INSTALL}") from None
    return gguf


def read_lora(adapter_dir: Path, fmt: str) -> LoraFactors:
    """The LoRA factors of an mlx-lm or PEFT directory; other methods are refused, saying why."""
    adapter_dir = Path(adapter_dir)
    if fmt == "peft":
        config, method, weights = peft_adapter.read_peft(adapter_dir)
        source = str(adapter_dir / peft_adapter.CONFIG_FILE)
        hyper = peft_adapter.peft_hyper(config, source)
        name, base, model_type = method.name, config.get("base_model_name_or_path"), None
    else:
        config = mlx_lm_adapter.read_adapter_config(adapter_dir)
        source = str(adapter_dir / mlx_lm_adapter.CONFIG_FILE)
        name, hyper = mlx_lm_adapter.method_and_hyper(config, source)
        weights = mlx_lm_adapter.read_tensors(adapter_dir / mlx_lm_adapter.WEIGHTS_FILE)
        base, model_type = config.get("model"), config.get("model_type")
    if name == "dora":
        raise UserError(f"{source}: DoRA rescales every output row by a learned magnitude, "
                        "which llama.cpp's LoRA (W + scale * B @ A) cannot express; fuse it "
                        "(mlx-lora fuse) and convert the fused model with convert_hf_to_gguf")
    if name != "lora":
        then = ("fuse it (mlx-lora fuse) and convert the fused model with convert_hf_to_gguf"
                if METHODS[name].fusable else "nor can it be fused; use it with mlx-lora serve")
        raise UserError(f"{source}: llama.cpp's adapter GGUF holds LoRA only, not {name}; {then}")
    return LoraFactors(hyper, weights, base, model_type, source)


def base_config(model: str | None, source: str) -> dict:
    """The base model's config.json (a text_config's keys lifted, as llama.cpp's converter does)."""
    if not model:
        raise UserError(f"{source} names no base model; pass --model with the base model's "
                        "directory (its config.json gives the architecture and head counts)")
    local = Path(model).expanduser()
    try:
        is_path = local.exists() or model.startswith((".", "/", "~"))
        path = local / "config.json" if is_path else _hub_config(model)
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the base model's config.json ({model}: {e}); pass --model "
                        "with the base model's directory or Hub id") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return {**config, **(config.get("text_config") or {}), "model_type": config.get("model_type")}


def _hub_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download  # only for a base named by Hub id

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as e:  # offline, unknown or gated repo: all answered by --model
        raise OSError(f"not a directory, and not fetched from the Hugging Face Hub: {e}") from None


def architecture(config: dict, factors: LoraFactors) -> tuple[str, bool]:
    """(gguf.MODEL_ARCH member, reorder q/k rows) for the base; an unsupported one is refused."""
    model_type = config.get("model_type")
    if factors.model_type and model_type and factors.model_type != model_type:
        raise UserError(f"{factors.source}: the adapter was trained on a {factors.model_type} "
                        f"model but the base config says {model_type}; pass --model with its base")
    if model_type not in ARCHS:
        raise UserError(f"--format gguf: model_type {model_type!r} is not supported "
                        f"(supported: {', '.join(ARCHS)})")
    return ARCHS[model_type]


def rope_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection in llama.cpp's order: each head's RoPE pairs made adjacent."""
    head_dim = rows.shape[0] // n_head
    half = head_dim // 2
    # GGUF row h*head_dim + 2*i + j holds the row HF keeps at h*head_dim + j*half + i.
    order = [h * head_dim + j * half + i
             for h in range(n_head) for i in range(half) for j in (0, 1)]
    return rows[np.array(order)]


def gguf_tensors(factors: LoraFactors, config: dict, arch, permute: bool,
                 gguf) -> dict[str, np.ndarray]:
    """`<base GGUF tensor>.lora_a` (r, in) and `.lora_b` (out, r) in float32, llama.cpp's layout."""
    model_type = config["model_type"]
    n_blocks = int(config.get("num_hidden_layers") or 0) or _blocks_in(factors.weights)
    names = gguf.get_tensor_name_map(arch, n_blocks)
    out = {}
    for path in peft_adapter.paths_of(factors.weights):
        hf = path.replace("language_model.", "")  # as the converter reads multimodal bases
        name = names.get_name(hf + ".weight", try_suffixes=(".weight",))
        if name is None or (name == "output.weight" and _tied_head(config, model_type)):
            raise UserError(f"{factors.source}: module '{path}' has no tensor in the base GGUF "
                            f"llama.cpp's converter writes for {model_type}; train without it")
        lora_a = np.array(factors.weights[f"{path}.lora_a"], dtype=np.float32).T
        lora_b = np.array(factors.weights[f"{path}.lora_b"], dtype=np.float32).T
        if permute and hf.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads"]
            if hf.endswith("k_proj"):
                heads = config.get("num_key_value_heads") or heads
            lora_b = rope_rows(lora_b, heads)
        out[name + ".lora_a"], out[name + ".lora_b"] = lora_a, lora_b
    return out


def _blocks_in(weights: dict) -> int:
    indices = [int(m["index"]) for p in peft_adapter.paths_of(weights)
               if (m := peft_adapter.BLOCK_PATH.fullmatch(p))]
    return max(indices, default=-1) + 1


def _tied_head(config: dict, model_type: str) -> bool:
    return model_type in NO_OUTPUT_TENSOR or bool(config.get("tie_word_embeddings"))


def lora_alpha(tensors: dict[str, np.ndarray], hyper: Hyper) -> float:
    """The alpha for which llama.cpp's alpha / rank is our scale (alpha / sqrt(r) for rsLoRA);
    for a zero scale, lora_b is zeroed in `tensors` instead."""
    alpha = hyper.scale * hyper.rank
    if alpha == 0.0:
        # llama.cpp reads alpha 0 as "no alpha" (scale 1): zero the update instead.
        for name in tensors:
            if name.endswith(".lora_b"):
                tensors[name] = np.zeros_like(tensors[name])
        alpha = float(hyper.rank)
    return alpha


def write_gguf(path: Path, arch_name: str, tensors: dict[str, np.ndarray], alpha: float,
               outtype: str, gguf) -> None:
    """Write the adapter GGUF atomically, tensors as f32 or f16."""
    dtype, file_type = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32),
                        "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}[outtype]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch_name)  # writes general.architecture
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(file_type)
        for name, array in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(array.astype(dtype)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomic(path, write, suffix=".tmp.gguf")


def export_gguf(adapter_dir: Path, fmt: str, save_path: Path, outtype: str,
                model: str | None) -> str:
    """Write the LoRA of `adapter_dir` (format `fmt`) as llama.cpp's adapter GGUF; returns
    the GGUF architecture it is for."""
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    gguf = import_gguf()
    factors = read_lora(adapter_dir, fmt)
    config = base_config(model or factors.base, factors.source)
    member, permute = architecture(config, factors)
    arch = getattr(gguf.MODEL_ARCH, member, None)
    if arch is None:  # an architecture newer than the installed gguf package
        raise UserError(f"this gguf package does not know {member.lower()}: pip install -U gguf")
    tensors = gguf_tensors(factors, config, arch, permute, gguf)
    alpha = lora_alpha(tensors, factors.hyper)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    write_gguf(Path(save_path), arch_name, tensors, alpha, outtype, gguf)
    status(f"{save_path}: LoRA on {len(tensors) // 2} tensors of llama.cpp's {arch_name} "
           f"(alpha {alpha:g}, rank {factors.hyper.rank}, {outtype}); load it over the base's GGUF")
    return arch_name
