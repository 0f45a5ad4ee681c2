"""llama.cpp's LoRA GGUF: read back with the gguf package, applied as llama.cpp applies it.

The reference is written here independently of mlx_lora's exporter: a base GGUF named and
row-reordered as llama.cpp's convert_hf_to_gguf does (LlamaModel.permute), W + alpha / rank *
B @ A as src/llama-graph.cpp's build_lora_mm adds it, and for llama a float64 forward pass with
llama.cpp's RoPE (adjacent pairs), against mlx_lora's adapted weights and logits.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_adapter, randomize_lora_b
from mlx_lm.utils import _get_classes
from safetensors.numpy import load_file

import mlx_lora
from mlx_lora.adapters.inject import inject, make_spec
from mlx_lora.adapters.lora import LoRALinear
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import export_adapter
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.model.adapted import load_adapted

gguf = pytest.importorskip("gguf")

IDS = [3, 17, 42, 99, 250, 7, 311, 64, 128, 5, 480, 21]
# llama.cpp's names for each block's linear layers (src/llama-arch.cpp).
BLOCK_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """A GGUF file's metadata, tensors (numpy layout: ne reversed) and tensor types."""
    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensors, types


def hf_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row order: within a head, interleave its two halves."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(arch: str, n_blocks: int, hf_name: str) -> str:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    assert name is not None, hf_name
    return name


def to_gguf_layout(config: dict, hf_name: str, w: np.ndarray) -> np.ndarray:
    """An HF (out, in) weight as llama.cpp's converter stores it (llama: q/k rows reordered)."""
    if config["model_type"] == "llama" and hf_name.endswith("q_proj.weight"):
        return hf_rope_rows(w, config["num_attention_heads"])
    if config["model_type"] == "llama" and hf_name.endswith("k_proj.weight"):
        return hf_rope_rows(w, config["num_key_value_heads"])
    return w


def base_gguf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """The tensors of the base GGUF llama.cpp's converter writes for an HF model dir (float64)."""
    config = json.loads((model_dir / "config.json").read_text())
    out = {}
    for name, w in load_file(str(model_dir / "model.safetensors")).items():
        out[gguf_name(config["model_type"], config["num_hidden_layers"], name)] = (
            to_gguf_layout(config, name, w).astype(np.float64))
    return out


def apply_lora(base: dict[str, np.ndarray], adapter: dict[str, np.ndarray],
               alpha: float) -> dict[str, np.ndarray]:
    """build_lora_mm's W x + scale * B (A x), folded into W; scale = alpha / rank (b's ne[0])."""
    out = dict(base)
    for name in [n[:-len(".lora_a")] for n in adapter if n.endswith(".lora_a")]:
        a, b = adapter[name + ".lora_a"].astype(np.float64), adapter[name + ".lora_b"]
        assert base[name].shape == (b.shape[0], a.shape[1])  # llama-adapter.cpp's shape check
        out[name] = base[name] + alpha / b.shape[1] * b.astype(np.float64) @ a
    return out


def write_base_gguf(model_dir: Path, path: Path) -> None:
    """Write the base GGUF (tensors only: enough to read back) with the gguf package."""
    config = json.loads((model_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), config["model_type"])
    for name, w in base_gguf_tensors(model_dir).items():
        writer.add_tensor(name, w.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_logits(t: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """A llama forward pass over GGUF tensors as llama.cpp computes it (float64)."""
    n_head, n_kv, eps = config["num_attention_heads"], config["num_key_value_heads"], \
        config["rms_norm_eps"]
    d, n = t["blk.0.attn_q.weight"].shape[0] // n_head, len(ids)
    angle = np.arange(n)[:, None, None] * config["rope_theta"] ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angle), np.sin(angle)  # (n, 1, d/2)

    def rope(v):  # llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate pairs (2i, 2i+1)
        out = np.empty_like(v)
        out[..., 0::2] = v[..., 0::2] * cos - v[..., 1::2] * sin
        out[..., 1::2] = v[..., 0::2] * sin + v[..., 1::2] * cos
        return out

    def norm(v, w):
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps) * w

    x = t["token_embd.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(config["num_hidden_layers"]):
        w = {k.split(".")[2]: v for k, v in t.items() if k.startswith(f"blk.{i}.")}
        h = norm(x, w["attn_norm"])
        q = rope((h @ w["attn_q"].T).reshape(n, n_head, d))
        k = np.repeat(rope((h @ w["attn_k"].T).reshape(n, n_kv, d)), n_head // n_kv, 1)
        v = np.repeat((h @ w["attn_v"].T).reshape(n, n_kv, d), n_head // n_kv, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(n, -1) @ w["attn_output"].T
        h = norm(x, w["ffn_norm"])
        g = h @ w["ffn_gate"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    return norm(x, t["output_norm.weight"]) @ t.get("output.weight", t["token_embd.weight"]).T


def fused_in_gguf_layout(model_dir: Path, adapter: Path) -> dict[str, np.ndarray]:
    """mlx_lora's fused weight (W + our scale * update) of every adapted layer, GGUF-named."""
    config = json.loads((model_dir / "config.json").read_text())
    loaded, _ = load_adapted(str(model_dir), str(adapter))
    out = {}
    for path, module in loaded.model.named_modules():
        if isinstance(module, LoRALinear):
            name = gguf_name(config["model_type"], config["num_hidden_layers"], path + ".weight")
            out[name] = to_gguf_layout(config, path + ".weight", np.array(module.fused_weight()))
    return out


LLAMA_CASES = {
    "all-linear": dict(),
    "rslora, q/k of the last block": dict(targets="q_proj,k_proj", num_layers=1, rslora=True,
                                          alpha=6.0),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_adapter_applied_as_llama_cpp_does_gives_our_weights_and_logits(
        tiny_llama, case, tmp_path):
    config = json.loads((tiny_llama / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    settings = LLAMA_CASES[case]
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", **settings)
    export_adapter(adapter, "gguf", tmp_path / "adapter.gguf")
    fields, tensors, types = read_gguf(tmp_path / "adapter.gguf")
    hyper = Hyper(4, settings.get("alpha", 8.0), 0.0, settings.get("rslora", False))
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(hyper.scale * 4, rel=1e-6)
    blocks = [1] if settings else [0, 1]
    kinds = ("attn_q", "attn_k") if settings else BLOCK_TENSORS
    expected = {f"blk.{i}.{k}.weight.lora_{x}" for i in blocks for k in kinds for x in "ab"}
    assert set(tensors) == expected and set(types.values()) == {"F32"}
    assert tensors["blk.1.attn_k.weight.lora_a"].shape == (4, 64)  # (rank, in)
    assert tensors["blk.1.attn_k.weight.lora_b"].shape == (32, 4)  # (out, rank)

    write_base_gguf(tiny_llama, tmp_path / "base.gguf")
    _, base, _ = read_gguf(tmp_path / "base.gguf")
    applied = apply_lora({k: v.astype(np.float64) for k, v in base.items()}, tensors,
                         fields["adapter.lora.alpha"])
    for name, fused in fused_in_gguf_layout(tiny_llama, adapter).items():
        np.testing.assert_allclose(applied[name], fused, atol=1e-6, err_msg=name)

    loaded, _ = load_adapted(str(tiny_llama), str(adapter))
    ours = np.array(loaded.model(mx.array(IDS)[None])[0])
    theirs = llama_cpp_logits(applied, config, IDS)
    assert np.abs(theirs - ours).max() < 1e-4
    assert np.abs(llama_cpp_logits(base, config, IDS) - ours).max() > 1e-3  # it does something
    # lora_b in HF's row order (what an exporter that skips the reorder writes) is caught:
    saved = mx.load(str(adapter / "adapters.safetensors"))
    naive = {**tensors, "blk.1.attn_q.weight.lora_b":
             np.array(saved["model.layers.1.self_attn.q_proj.lora_b"]).T}
    naive_logits = llama_cpp_logits(apply_lora(base, naive, fields["adapter.lora.alpha"]),
                                    config, IDS)
    assert np.abs(naive_logits - ours).max() > 1e-3


def test_qwen2_is_not_reordered_and_rslora_is_exact(tiny_qwen2, tmp_path):
    adapter = make_adapter(tiny_qwen2, tmp_path / "adapter", rslora=True, alpha=6.0, rank=4)
    export_adapter(adapter, "gguf", tmp_path / "adapter.gguf")
    fields, tensors, _ = read_gguf(tmp_path / "adapter.gguf")
    assert fields["general.architecture"] == "qwen2"
    # llama.cpp's scale is alpha / rank: alpha 6 / sqrt(4) = 3 needs adapter.lora.alpha 12
    assert fields["adapter.lora.alpha"] == pytest.approx(12.0)
    assert {n.rsplit(".", 2)[0] for n in tensors} == {
        f"blk.{i}.{k}" for i in (0, 1) for k in BLOCK_TENSORS}
    write_base_gguf(tiny_qwen2, tmp_path / "base.gguf")
    _, base, _ = read_gguf(tmp_path / "base.gguf")
    assert "output.weight" not in base  # tied: llama.cpp reads token_embd
    applied = apply_lora(base, tensors, fields["adapter.lora.alpha"])
    fused = fused_in_gguf_layout(tiny_qwen2, adapter)
    for name, weight in fused.items():
        np.testing.assert_allclose(applied[name], weight, atol=1e-6, err_msg=name)
    assert np.abs(fused["blk.0.attn_q.weight"] - base["blk.0.attn_q.weight"]).max() > 1e-3


# mlx-lm model_type -> (llama.cpp's general.architecture, its q/k rows reordered, tensors)
ARCH_CASES = {
    "llama": ("llama", True, BLOCK_TENSORS),
    "mistral": ("llama", True, BLOCK_TENSORS),
    "qwen2": ("qwen2", False, BLOCK_TENSORS),
    "qwen3": ("qwen3", False, BLOCK_TENSORS),
    "gemma": ("gemma", False, BLOCK_TENSORS),
    "gemma2": ("gemma2", False, BLOCK_TENSORS),
    "gemma3_text": ("gemma3", False, BLOCK_TENSORS),
    "gemma3": ("gemma3", False, BLOCK_TENSORS),
    "phi3": ("phi3", False, ("attn_qkv", "attn_output", "ffn_up", "ffn_down")),
}
TINY = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, vocab_size=64,
            rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_mlx_lm_adapter(model_type: str, tmp_path: Path, rank: int = 4) -> tuple[Path, dict]:
    """A random mlx-lm model of this architecture (its config.json only on disk) with an
    all-linear LoRA of random non-zero lora_b saved in tmp_path/adapter."""
    config = dict(TINY, model_type=model_type)
    if model_type == "gemma3":  # the multimodal wrapper: the text model is language_model
        config = {"model_type": "gemma3", "vision_config": {},
                  "text_config": dict(TINY, model_type="gemma3_text")}
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(0)
    spec = make_spec(model, "lora", "all-linear", -1, Hyper(rank, 8.0))
    inject(model, spec)
    randomize_lora_b(model)
    save_adapters(tmp_path / "adapter", model, spec, str(base))
    return tmp_path / "adapter", {p: m for p, m in model.named_modules()
                                  if isinstance(m, LoRALinear)}


@pytest.mark.parametrize("model_type", ARCH_CASES)
def test_every_supported_architecture_names_and_orients_as_llama_cpp(model_type, tmp_path):
    arch, reordered, kinds = ARCH_CASES[model_type]
    adapter, layers = tiny_mlx_lm_adapter(model_type, tmp_path)
    export_adapter(adapter, "gguf", tmp_path / "adapter.gguf")
    fields, tensors, _ = read_gguf(tmp_path / "adapter.gguf")
    assert fields["general.architecture"] == arch
    assert set(tensors) == {f"blk.{i}.{k}.weight.lora_{x}" for i in (0, 1) for k in kinds
                            for x in "ab"}
    scale = fields["adapter.lora.alpha"] / 4
    for path, layer in layers.items():
        block, kind = path.split(".layers.")[1].split(".", 1)
        name = f"blk.{block}." + {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                                  "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
                                  "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
                                  "mlp.down_proj": "ffn_down"}[kind] + ".weight"
        update = np.array(layer.fused_weight() - layer.linear.weight)  # (out, in), ours
        if reordered and kind in ("self_attn.q_proj", "self_attn.k_proj"):
            update = hf_rope_rows(update, 4 if kind == "self_attn.q_proj" else 2)
        theirs = scale * tensors[name + ".lora_b"] @ tensors[name + ".lora_a"]
        np.testing.assert_allclose(theirs, update, atol=1e-6, err_msg=name)


def test_f16_holds_the_f32_factors_rounded(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    export_adapter(adapter, "gguf", tmp_path / "f32.gguf")
    export_adapter(adapter, "gguf", tmp_path / "f16.gguf", outtype="f16")
    f32_fields, f32, _ = read_gguf(tmp_path / "f32.gguf")
    f16_fields, f16, types = read_gguf(tmp_path / "f16.gguf")
    assert set(types.values()) == {"F16"} and set(f16) == set(f32)
    assert f16_fields["adapter.lora.alpha"] == f32_fields["adapter.lora.alpha"]
    for name, value in f32.items():
        assert f16[name].dtype == np.float16
        np.testing.assert_array_equal(f16[name], value.astype(np.float16), err_msg=name)
    assert (tmp_path / "f16.gguf").stat().st_size < 0.6 * (tmp_path / "f32.gguf").stat().st_size


def test_a_peft_directory_exports_the_same_gguf(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", rslora=True, alpha=6.0,
                           targets="q_proj,v_proj,down_proj")
    export_adapter(adapter, "peft", tmp_path / "peft")
    assert export_adapter(tmp_path / "peft", "gguf", tmp_path / "peft.gguf",
                          model=str(tiny_llama)) == "peft"
    export_adapter(adapter, "gguf", tmp_path / "ours.gguf")
    peft_fields, peft, _ = read_gguf(tmp_path / "peft.gguf")
    our_fields, ours, _ = read_gguf(tmp_path / "ours.gguf")
    assert peft_fields["adapter.lora.alpha"] == pytest.approx(our_fields["adapter.lora.alpha"])
    assert set(peft) == set(ours) and len(ours) == 2 * 2 * 3
    for name, value in ours.items():
        np.testing.assert_array_equal(peft[name], value, err_msg=name)


def test_a_zero_scale_stays_zero_where_llama_cpp_reads_alpha_0_as_scale_1(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", alpha=0.0, targets="v_proj")
    export_adapter(adapter, "gguf", tmp_path / "adapter.gguf")
    fields, tensors, _ = read_gguf(tmp_path / "adapter.gguf")
    assert fields["adapter.lora.alpha"] != 0.0
    for name in ("blk.0.attn_v.weight", "blk.1.attn_v.weight"):
        assert not (tensors[name + ".lora_b"] @ tensors[name + ".lora_a"]).any()


def edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))


REFUSALS = {
    "dora": (dict(method="dora"), {}, "DoRA rescales every output row"),
    "another architecture": ({}, dict(model_type="qwen2"), "trained on a qwen2 model"),
    "no base config": ({}, dict(model="/nowhere/base"), "pass --model"),
    "no base named": ({}, dict(model=None), "pass --model"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_llama_cpp_cannot_hold_is_refused_in_one_line(tiny_llama, case, tmp_path):
    settings, changes, message = REFUSALS[case]
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", **settings)
    edit_config(adapter, **changes)
    with pytest.raises(UserError, match=message) as error:
        export_adapter(adapter, "gguf", tmp_path / "adapter.gguf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "adapter.gguf").exists()


def test_an_unsupported_architecture_and_a_missing_package_are_named(tiny_llama, tmp_path,
                                                                     monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    edit_config(adapter, model_type=None)
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        export_adapter(adapter, "gguf", tmp_path / "a.gguf", model=str(base))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'mlx-lora\[gguf\]'"):
        export_adapter(adapter, "gguf", tmp_path / "a.gguf")


def test_cli_and_api_export_gguf(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    edit_config(adapter, model="/moved/away")
    args = ["export", "--adapter-path", str(adapter), "--format", "gguf", "--outtype", "f16",
            "--save-path", str(tmp_path / "cli.gguf")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "pass --model" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, [*args, "--model", str(tiny_llama)])
    assert result.exit_code == 0, result.output
    _, cli_tensors, types = read_gguf(tmp_path / "cli.gguf")
    assert set(types.values()) == {"F16"}
    assert mlx_lora.export(adapter, tmp_path / "api.gguf", format="gguf",
                           model=str(tiny_llama)) == "mlx-lm"
    _, api_tensors, _ = read_gguf(tmp_path / "api.gguf")
    for name, value in api_tensors.items():
        np.testing.assert_array_equal(cli_tensors[name], value.astype(np.float16))
    result = CliRunner().invoke(cli, [*args[:-1], str(tmp_path), "--model", str(tiny_llama)])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_adapter_weights_are_what_mlx_lm_saves(tiny_llama, tmp_path):
    """The exported factors are the saved ones, transposed: nothing else changes them."""
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", targets="v_proj")
    export_adapter(adapter, "gguf", tmp_path / "adapter.gguf")
    _, tensors, _ = read_gguf(tmp_path / "adapter.gguf")
    saved = mx.load(str(adapter / "adapters.safetensors"))
    for i in (0, 1):
        path = f"model.layers.{i}.self_attn.v_proj"
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_v.weight.lora_a"],
                                      np.array(saved[path + ".lora_a"]).T)
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_v.weight.lora_b"],
                                      np.array(saved[path + ".lora_b"]).T)
