"""Bottleneck adapters: AdapterHub's two placements against a plain MLX computation of the
definition, training through the CLI and the API, refusals, and generate / eval / serve.

The invariants every method shares (fresh equals base, save/load, resume, refused fuse and
PEFT export) are in test_adapters.py's table; these are the bottleneck adapters' own.
"""

import http.client
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import addition_rows, make_adapter, write_splits
from mlx_lm.models.base import create_attention_mask

from mlx_lora import Finetune
from mlx_lora.adapters.bottleneck import BottleneckAdapter
from mlx_lora.adapters.inject import adapter_layers, inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.errors import UserError
from mlx_lora.generate import complete
from mlx_lora.model.adapted import load_adapted
from mlx_lora.model.load import load_base
from mlx_lora.serve import start_server

ROWS = addition_rows(6, 4)
IDS = mx.array([[1, 5, 9, 33, 70, 2, 8, 100, 41, 7]])
ACTIVATION = {"pfeiffer": lambda v: mx.maximum(v, 0), "houlsby": lambda v: v * mx.sigmoid(v)}


def with_adapters(model_dir, variant: str, num_layers: int = -1, size: int = 0, seed: int = 1):
    """The tiny model with fresh bottleneck adapters, then every adapter tensor randomized."""
    loaded = load_base(str(model_dir))
    spec = make_spec(loaded.model, "adapter", "", num_layers,
                     Hyper(8, 16.0, adapter_variant=variant, adapter_size=size))
    inject(loaded.model, spec)
    mx.random.seed(seed)
    for _, layer in adapter_layers(loaded.model):
        for name in ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias"):
            layer[name] = 0.3 * mx.random.normal(layer[name].shape)
    return loaded, spec


def bottleneck(params: dict, variant: str, h: mx.array) -> mx.array:
    """The definition, written out: h + up(act(down(h))) with biases."""
    z = ACTIVATION[variant](h @ params["adapter_down"] + params["adapter_down_bias"])
    return h + z @ params["adapter_up"] + params["adapter_up_bias"]


def reference_logits(model_dir, adapters: dict, variant: str) -> mx.array:
    """Logits of an unadapted copy of the base, its llama blocks run by hand with the
    bottleneck added where AdapterHub adds it (adapters: path -> its four tensors)."""
    model = load_base(str(model_dir)).model
    h = model.model.embed_tokens(IDS)
    mask = create_attention_mask(h, None)
    for i, block in enumerate(model.layers):
        path = f"model.layers.{i}"
        if variant == "pfeiffer":  # on the residual stream, after the block
            h = bottleneck(adapters[path], variant, block(h, mask))
            continue
        attn = block.self_attn(block.input_layernorm(h), mask)  # after each sublayer's output
        h = h + bottleneck(adapters[f"{path}.self_attn"], variant, attn)
        ffn = block.mlp(block.post_attention_layernorm(h))
        h = h + bottleneck(adapters[f"{path}.mlp"], variant, ffn)
    return model.lm_head(model.model.norm(h))


@pytest.mark.parametrize("variant", ["pfeiffer", "houlsby"])
def test_the_layers_compute_adapterhubs_definition(tiny_llama, variant):
    loaded, spec = with_adapters(tiny_llama, variant)
    layers = dict(adapter_layers(loaded.model))
    assert list(layers) == list(spec.paths) and all(
        isinstance(m, BottleneckAdapter) for m in layers.values())
    adapters = {path: dict(layer.trainable_parameters()) for path, layer in layers.items()}
    expected = reference_logits(tiny_llama, adapters, variant)
    got = loaded.model(IDS)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-4, rtol=1e-4)
    base = load_base(str(tiny_llama)).model(IDS)
    assert np.abs(np.array(got) - np.array(base)).max() > 0.1  # the adapters do something


@pytest.mark.parametrize("variant, wrapped", [("pfeiffer", {"model.layers.1"}),
                                              ("houlsby", {"model.layers.1.self_attn",
                                                           "model.layers.1.mlp"})])
def test_placement_size_and_num_layers(tiny_llama, variant, wrapped):
    loaded, spec = with_adapters(tiny_llama, variant, num_layers=1)
    assert set(spec.paths) == wrapped
    assert spec.hyper.hidden_size == 64 and spec.hyper.adapter_size == 64 // 16  # AdapterHub's
    _, sized = with_adapters(tiny_llama, variant, size=12)
    assert sized.hyper.adapter_size == 12
    layer = dict(adapter_layers(loaded.model))["model.layers.1" if variant == "pfeiffer" else
                                                "model.layers.1.mlp"]
    assert layer.adapter_down.shape == (64, 4) and layer.adapter_up.shape == (4, 64)
    # It answers for the module it wraps: mlx-lm reads blocks' attributes (layer.use_sliding).
    name = "use_sliding" if variant == "pfeiffer" else "gate_proj"
    assert getattr(layer, name) is getattr(layer.base, name)


def test_a_half_precision_base_keeps_its_dtype(tiny_llama):
    loaded = load_base(str(tiny_llama))
    loaded.model.set_dtype(mx.float16)
    inject(loaded.model, make_spec(loaded.model, "adapter", "", -1, Hyper(8, 16.0)))
    assert loaded.model(IDS).dtype == mx.float16
    layer = adapter_layers(loaded.model)[0][1]
    assert layer.adapter_up.dtype == mx.float32  # the adapter itself stays float32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("bottleneck_data"),
                        {"train": ROWS[:20], "valid": ROWS[20:]})


def val_losses(out) -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["val_loss"] for e in events if e["event"] == "val"]


@pytest.fixture(scope="module")
def cli_run(tiny_llama, data, tmp_path_factory):
    """A default (pfeiffer) run through the CLI."""
    out = tmp_path_factory.mktemp("bottleneck_cli") / "run"
    result = CliRunner().invoke(cli, [
        "train", "--model", str(tiny_llama), "--data", str(data), "--adapter-path", str(out),
        "--fine-tune-type", "adapter", "--iters", "8", "--batch-size", "4",
        "--learning-rate", "1e-2", "--steps-per-eval", "8", "--mask-prompt"])
    assert result.exit_code == 0, result.output
    return out


def test_cli_training_lowers_the_validation_loss_and_records_the_size(cli_run):
    val = val_losses(cli_run)
    assert len(val) == 2 and val[-1] < val[0]
    saved = json.loads((cli_run / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "adapter" and saved["adapter_variant"] == "pfeiffer"
    assert (saved["adapter_size"], saved["hidden_size"], saved["num_layers"]) == (4, 64, 2)
    assert yaml.safe_load((cli_run / "config.yaml").read_text())["adapter_size"] == 4
    tensors = mx.load(str(cli_run / "adapters.safetensors"))
    assert sorted(tensors) == sorted(f"model.layers.{i}.{name}" for i in range(2) for name in (
        "adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias"))


def test_api_training_houlsby_lowers_the_validation_loss(tiny_llama, tmp_path):
    run = Finetune(model=str(tiny_llama), data={"train": ROWS[:20], "valid": ROWS[20:]},
                   adapter_path=str(tmp_path / "run"), fine_tune_type="adapter",
                   adapter_variant="houlsby", adapter_size=8, iters=8, batch_size=4,
                   learning_rate=1e-2, steps_per_eval=8, mask_prompt=True)
    assert run.train().finished
    val = val_losses(tmp_path / "run")
    assert len(val) == 2 and val[-1] < val[0]
    assert run.evaluate(split="valid")["loss"] == pytest.approx(val[-1], rel=1e-4)
    assert {p.rsplit(".", 1)[-1] for p, _ in adapter_layers(run.model().model)} == {
        "self_attn", "mlp"}


def test_gradient_checkpointing_of_wrapped_blocks_changes_nothing(tiny_llama, tmp_path):
    saved = []
    for checkpoint in (False, True):  # pfeiffer's wrappers are the blocks that recompute
        out = tmp_path / str(checkpoint)
        Finetune(model=str(tiny_llama), data={"train": ROWS[:20], "valid": ROWS[20:]},
                 adapter_path=str(out), fine_tune_type="adapter", iters=3, batch_size=4,
                 learning_rate=1e-2, grad_checkpoint=checkpoint).train()
        saved.append(mx.load(str(out / "adapters.safetensors")))
    for name, value in saved[0].items():
        np.testing.assert_allclose(np.array(saved[1][name]), np.array(value), atol=1e-6)
    assert np.abs(np.array(saved[0]["model.layers.1.adapter_up"])).max() > 0  # it trained


def test_a_resume_with_another_size_or_variant_is_refused(tiny_llama, data, cli_run,
                                                          tmp_path):
    shutil.copytree(cli_run, tmp_path / "run")
    for flag, value in (("adapter_size", 8), ("adapter_variant", "houlsby")):
        run = Finetune(model=str(tiny_llama), data=str(data), adapter_path=str(tmp_path / "run"),
                       resume=True, fine_tune_type="adapter", iters=8, batch_size=4,
                       learning_rate=1e-2, steps_per_eval=8, mask_prompt=True, **{flag: value})
        with pytest.raises(UserError, match=f"other settings \\({flag}"):
            run.train()


@pytest.mark.parametrize("options, message", [
    ({"fine_tune_type": "adapter", "targets": "q_proj"}, "--targets picks linear layers"),
    ({"fine_tune_type": "lora", "adapter_size": 8}, "use them with --fine-tune-type adapter"),
    ({"fine_tune_type": "adapter", "dropout": 0.1}, "act on LoRA's factors"),
])
def test_settings_it_cannot_honor_are_refused(tiny_llama, data, tmp_path, options, message):
    run = Finetune(model=str(tiny_llama), data=str(data), adapter_path=str(tmp_path / "run"),
                   **options)
    with pytest.raises(UserError, match=message):
        run.train()


@pytest.mark.parametrize("command, message", [
    (["fuse", "--save-path", "{tmp}/fused"], "cannot be fused"),
    (["export", "--format", "peft", "--save-path", "{tmp}/peft"], "PEFT has no format"),
    (["export", "--format", "gguf", "--save-path", "{tmp}/a.gguf"], "holds LoRA only"),
])
def test_fuse_and_export_refuse_in_one_line(cli_run, tiny_llama, tmp_path, command, message):
    model = ["--model", str(tiny_llama)] if command[0] == "fuse" else []
    args = [c.format(tmp=tmp_path) for c in command]
    result = CliRunner().invoke(cli, [*args[:1], *model, "--adapter-path", str(cli_run),
                                      *args[1:]])
    assert result.exit_code == 2 and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_a_base_of_another_width_is_refused(cli_run, tiny_llama, tmp_path):
    config = json.loads((cli_run / "adapter_config.json").read_text())
    (tmp_path / "adapters.safetensors").write_bytes(
        (cli_run / "adapters.safetensors").read_bytes())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(UserError, match="read and write width 32 but this model's hidden size"):
        load_adapted(str(tiny_llama), str(tmp_path))


def test_generate_and_eval_use_the_adapter(cli_run, tiny_llama, data):
    prompt = ROWS[21]["prompt"]
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_llama), "--adapter-path",
                                      str(cli_run), "--prompt", prompt, "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    adapted = load_adapted(str(tiny_llama), str(cli_run))[0]
    assert result.stdout == complete(adapted, prompt, max_tokens=12) + "\n"
    assert result.stdout != complete(load_adapted(str(tiny_llama), None)[0], prompt,
                                     max_tokens=12) + "\n"
    result = CliRunner().invoke(cli, [
        "eval", "--model", str(tiny_llama), "--adapter-path", str(cli_run), "--data", str(data),
        "--split", "valid", "--mask-prompt", "--general-data", "builtin", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.splitlines()[-1])
    assert metrics["loss"] == pytest.approx(val_losses(cli_run)[-1], rel=1e-4)
    assert metrics["general_loss"] != metrics["general_loss_base"]  # the base: bypassed


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """Both placements and a LoRA, served from one base."""
    root = tmp_path_factory.mktemp("bottleneck_serve")
    dirs = {"pfeiffer": _saved(tiny_llama, root / "pfeiffer", "pfeiffer", 1),
            "houlsby": _saved(tiny_llama, root / "houlsby", "houlsby", 2),
            "lora": str(make_adapter(tiny_llama, root / "lora", seed=3))}
    with start_server(str(tiny_llama), dirs, port=0) as server:
        yield server, dirs


def _saved(model_dir, adapter_dir, variant: str, seed: int) -> str:
    from mlx_lora.formats.mlx_lm_adapter import save_adapters

    loaded, spec = with_adapters(model_dir, variant, seed=seed)
    save_adapters(adapter_dir, loaded.model, spec, str(model_dir))
    return str(adapter_dir)


def ask(server, model: str) -> str:
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    body = {"model": model, "messages": [{"role": "user", "content": "the cat sat on the"}],
            "max_tokens": 16, "temperature": 0}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
    payload = json.loads(connection.getresponse().read())
    connection.close()
    return payload["choices"][0]["message"]["content"]


def test_served_greedy_answers_equal_generate(served, tiny_llama):
    server, dirs = served
    names = [*dirs, "base"] * 2
    with ThreadPoolExecutor(len(names)) as pool:  # taking turns, swapping adapters between
        answers = list(pool.map(lambda name: ask(server, name), names))
    expected = {name: complete(load_adapted(str(tiny_llama), dirs.get(name))[0],
                               "the cat sat on the", max_tokens=16) for name in [*dirs, "base"]}
    assert answers == [expected[name] for name in names]
    assert len(set(expected.values())) == len(expected)  # each adapter answers its own way
