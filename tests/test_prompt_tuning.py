"""Prompt and prefix tuning: the forward pass against independent computations, PEFT both ways,
training, generation, eval and serve with virtual tokens, and what they refuse.

The invariants every method shares (save/load, resume, PEFT export, fuse refused) are in
test_adapters.py's table; these are the virtual tokens' own.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import addition_rows, make_adapter
from test_peft import IDS, TOLERANCE, hf_model, require, theirs

from mlx_lora import Finetune
from mlx_lora.adapters.inject import bypassed, inject, make_spec
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.cli import cli
from mlx_lora.data.records import read_records
from mlx_lora.data.tokenize import to_examples
from mlx_lora.errors import UserError
from mlx_lora.evaluate import greedy
from mlx_lora.formats.convert import export_adapter
from mlx_lora.formats.mlx_lm_adapter import save_adapters
from mlx_lora.generate import complete
from mlx_lora.model.adapted import load_adapted
from mlx_lora.model.load import load_base
from mlx_lora.model.prefix_cache import KEY, PrefixCache, init_ids, prefix_cache
from mlx_lora.serve import start_server

METHODS = ("prompt", "prefix")
TEXT_IDS = [5, 9, 33, 70]
ROWS = addition_rows(6, 4)


def virtual_model(model_dir, method: str, n: int = 4, ids=(), quantize: int = 0, seed: int = 0):
    """The base with n virtual tokens of `method`, starting as the tokens `ids` (else random)."""
    loaded = load_base(str(model_dir), quantize=quantize)
    mx.random.seed(seed)
    spec = make_spec(loaded.model, method, "", -1,
                     Hyper(0, 0.0, virtual_tokens=n, init_ids=tuple(ids)))
    inject(loaded.model, spec)
    return loaded, spec


def moved(loaded, seed: int = 1, std: float = 0.5):
    """The virtual tokens moved well away from any token's, as training moves them."""
    virtual = loaded.model[KEY]
    noise = mx.random.normal(virtual.prompt_embeddings.shape, key=mx.random.key(seed))
    virtual.prompt_embeddings = virtual.prompt_embeddings + std * noise
    return loaded


def forward(model, tokens: mx.array) -> mx.array:
    """Logits (B, L, V) with the model's virtual tokens before every row."""
    return model(tokens, cache=prefix_cache(model))


@pytest.fixture(params=["tiny_llama", "tiny_qwen2"])
def base_dir(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("quantize", [0, 4], ids=["float", "4-bit"])
@pytest.mark.parametrize("method", METHODS)
def test_virtual_tokens_from_text_are_the_base_reading_it_first(tiny_llama, method, quantize):
    loaded, _ = virtual_model(tiny_llama, method, len(TEXT_IDS), TEXT_IDS, quantize)
    base = load_base(str(tiny_llama), quantize=quantize).model
    expected = base(mx.array([TEXT_IDS + IDS]))[:, len(TEXT_IDS):]
    got = forward(loaded.model, mx.array([IDS]))
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-4, rtol=0)


def test_prompt_is_the_base_on_virtual_then_token_embeddings(tiny_qwen2):
    n = 5
    model = moved(virtual_model(tiny_qwen2, "prompt", n)[0], std=0.1).model
    tokens = mx.array([IDS, IDS[::-1]])  # two rows share the virtual tokens
    embedded = model.model.embed_tokens(tokens)  # (2, L, H)
    virtual = mx.broadcast_to(model[KEY].prompt_embeddings[None], (2, n, embedded.shape[-1]))
    joined = mx.concatenate([virtual, embedded], axis=1)  # one causal pass over N + L
    expected = model(mx.zeros(joined.shape[:2], mx.int32), input_embeddings=joined)[:, n:]
    np.testing.assert_allclose(np.array(forward(model, tokens)), np.array(expected),
                               atol=1e-5, rtol=0)


def rope(x: np.ndarray, offset: int, base: float = 10000.0) -> np.ndarray:
    """Rotary embedding of (B, heads, L, d) from position `offset` (halves rotated, as llama)."""
    half = x.shape[-1] // 2
    angles = np.arange(offset, offset + x.shape[2])[:, None] * base ** (-np.arange(half) / half)
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def test_prefix_attention_is_plain_attention_over_prepended_keys_values(tiny_llama):
    loaded, _ = virtual_model(tiny_llama, "prefix", 3)
    moved(loaded)
    n, heads, kv_heads, d, batch, length = 3, 4, 2, 16, 2, 6
    attention = loaded.model.model.layers[1].self_attn
    # PEFT's layout, read independently: (N, layers, keys|values, kv_heads, head_dim)
    table = np.array(loaded.model[KEY].prompt_embeddings).reshape(n, 2, 2, kv_heads, d)
    prefix_k, prefix_v = table[:, 1, 0].transpose(1, 0, 2), table[:, 1, 1].transpose(1, 0, 2)
    x = mx.random.normal((batch, length, 64), key=mx.random.key(2))

    def heads_of(proj, count):
        return np.array(proj(x)).reshape(batch, length, count, d).transpose(0, 2, 1, 3)

    q = rope(heads_of(attention.q_proj, heads), n)
    k = np.concatenate([np.broadcast_to(prefix_k, (batch, kv_heads, n, d)),
                        rope(heads_of(attention.k_proj, kv_heads), n)], axis=2)
    v = np.concatenate([np.broadcast_to(prefix_v, (batch, kv_heads, n, d)),
                        heads_of(attention.v_proj, kv_heads)], axis=2)
    k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)  # (B, heads, L, N + L)
    visible = np.arange(n + length)[None] <= n + np.arange(length)[:, None]
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    out = (weights / weights.sum(-1, keepdims=True)) @ v
    expected = attention.o_proj(mx.array(out.transpose(0, 2, 1, 3).reshape(batch, length, -1)))
    keys, values = loaded.model[KEY].keys_values(loaded.model)[1]
    cache = PrefixCache(keys, values)
    got = attention(x, mask=cache.make_mask(length), cache=cache)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_exported_adapter_gives_our_logits_in_peft(base_dir, method, tmp_path):
    peft = require("peft")
    loaded, spec = virtual_model(base_dir, method, 5)
    moved(loaded)
    save_adapters(tmp_path / "ours", loaded.model, spec, str(base_dir))
    export_adapter(tmp_path / "ours", "peft", tmp_path / "peft")
    model = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "peft")
    expected = np.array(forward(loaded.model, mx.array([IDS]))[0])
    assert np.abs(theirs(model)[-len(IDS):] - expected).max() < TOLERANCE
    base = np.array(load_base(str(base_dir)).model(mx.array([IDS]))[0])
    assert np.abs(expected - base).max() > 0.05  # the virtual tokens do something


@pytest.mark.parametrize("method", [*METHODS, "prefix+projection"])
def test_peft_adapter_loads_here_and_imports_with_its_logits(base_dir, method, tmp_path):
    torch, peft = require("torch"), require("peft")
    if method == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    else:  # with projection, PEFT trains an MLP and saves its output: the keys and values
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                         prefix_projection=method.endswith("projection"))
        method = "prefix"
    torch.manual_seed(0)  # PEFT's own random init: N(0, 1) embeddings, keys and values
    model = peft.get_peft_model(hf_model(base_dir), config)
    model.save_pretrained(tmp_path / "peft")
    expected = theirs(model)[-len(IDS):]
    loaded, spec = load_adapted(str(base_dir), str(tmp_path / "peft"))
    assert spec.method == method and spec.hyper.virtual_tokens == 6
    assert np.abs(np.array(forward(loaded.model, mx.array([IDS]))[0]) - expected).max() < TOLERANCE
    result = CliRunner().invoke(cli, ["import", "--adapter-path", str(tmp_path / "peft"),
                                      "--save-path", str(tmp_path / "mlx")])
    assert result.exit_code == 0, result.output
    loaded, _ = load_adapted(str(base_dir), str(tmp_path / "mlx"))
    assert np.abs(np.array(forward(loaded.model, mx.array([IDS]))[0]) - expected).max() < TOLERANCE


def test_text_init_is_pefts(tiny_llama):
    peft = require("peft")
    text, n = "the cat sat", 7
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                     prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                     tokenizer_name_or_path=str(tiny_llama))
    model = peft.get_peft_model(hf_model(tiny_llama), config)
    expected = model.prompt_encoder["default"].embedding.weight.detach().numpy()
    loaded = load_base(str(tiny_llama))
    ids = init_ids(loaded.tokenizer, text, n)
    assert len(set(ids)) < n  # the text's tokens, repeated to n
    got, _ = virtual_model(tiny_llama, "prompt", n, ids)
    np.testing.assert_array_equal(np.array(got.model[KEY].prompt_embeddings), expected)


def test_bypassed_takes_the_virtual_tokens_out(tiny_llama):
    loaded = moved(virtual_model(tiny_llama, "prefix")[0])
    base = np.array(load_base(str(tiny_llama)).model(mx.array([IDS])))
    with bypassed(loaded.model) as model:  # what the forgetting probe measures the base with
        np.testing.assert_array_equal(np.array(forward(model, mx.array([IDS]))), base)
    assert np.abs(np.array(forward(loaded.model, mx.array([IDS]))) - base).max() > 1e-3


def write_data(root):
    data = root / "data"
    data.mkdir()
    for split, rows in (("train", ROWS[:20]), ("valid", ROWS[20:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def val_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["val_loss"] for line in lines if line["event"] == "val"]


def test_api_training_lowers_the_validation_loss(tiny_llama, tmp_path):
    run = Finetune(model=str(tiny_llama), data={"train": ROWS[:20], "valid": ROWS[20:]},
                   adapter_path=str(tmp_path / "run"), fine_tune_type="prompt",
                   num_virtual_tokens=4, prompt_init_text="Add the numbers", iters=10,
                   batch_size=4, learning_rate=3e-2, steps_per_eval=10, mask_prompt=True)
    assert run.train().finished
    val = val_losses(tmp_path / "run")
    assert len(val) == 2 and val[-1] < val[0]
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["pack"] is False  # one set of virtual tokens per row: packing is off
    assert run.evaluate(split="valid")["loss"] == pytest.approx(val[-1], rel=1e-5)


def test_cli_training_lowers_the_validation_loss_and_eval_agrees(tiny_llama, tmp_path):
    data, out = write_data(tmp_path), tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--model", str(tiny_llama), "--data", str(data), "--adapter-path", str(out),
        "--fine-tune-type", "prefix", "--num-virtual-tokens", "4", "--iters", "10",
        "--batch-size", "4", "--learning-rate", "3e-2", "--steps-per-eval", "10",
        "--mask-prompt"])
    assert result.exit_code == 0, result.output
    val = val_losses(out)
    assert len(val) == 2 and val[-1] < val[0]
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--adapter-path",
                                      str(out), "--data", str(data), "--split", "valid",
                                      "--mask-prompt", "--json"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.output.strip().splitlines()[-1])
    expected = plain_loss(tiny_llama, out, data / "valid.jsonl")
    assert reported["loss"] == pytest.approx(expected, rel=1e-5)


def plain_loss(model_dir, adapter_dir, data_file) -> float:
    """Mean cross-entropy per target token, each record alone through its full logits (in
    float64), with the virtual tokens before it: no batching, padding or chunked loss."""
    loaded, _ = load_adapted(str(model_dir), str(adapter_dir))
    examples = to_examples(read_records(data_file), loaded.tokenizer, 2048, True, "valid")
    total, count = 0.0, 0
    for example in examples:
        ids, targets = example.ids[:-1], example.ids[1:]
        logits = np.array(forward(loaded.model, mx.array(ids)[None])[0], dtype=np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        picked = logp[np.arange(len(targets)), targets]
        total -= picked[example.mask[1:]].sum()
        count += int(example.mask[1:].sum())
    return total / count


@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_a_greedy_decode_without_a_cache(tiny_llama, tmp_path, method):
    loaded, spec = virtual_model(tiny_llama, method, 4)
    moved(loaded, std=1.0)
    save_adapters(tmp_path, loaded.model, spec, str(tiny_llama))
    loaded, _ = load_adapted(str(tiny_llama), str(tmp_path))  # as mlx-lora generate loads it
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer.encode("the cat sat on the")
    out = []
    for _ in range(12):  # every step recomputes the whole sequence after the virtual tokens
        token = int(mx.argmax(forward(model, mx.array([prompt + out]))[0, -1]).item())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    assert len(out) >= 4  # enough tokens to compare
    assert greedy(model, tokenizer, prompt, 12) == out  # eval's generations
    text = complete(loaded, "the cat sat on the", max_tokens=12, chat=False)
    assert text == tokenizer.decode(out)  # mlx-lora generate's


def test_the_cli_generates_with_the_adapter(tiny_llama, tmp_path):
    loaded, spec = virtual_model(tiny_llama, "prompt", 4)
    moved(loaded, std=1.0)
    save_adapters(tmp_path, loaded.model, spec, str(tiny_llama))
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_llama), "--adapter-path",
                                      str(tmp_path), "--prompt", "the cat", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    expected = complete(load_adapted(str(tiny_llama), str(tmp_path))[0], "the cat", 8)
    assert result.stdout == expected + "\n"
    assert expected != complete(load_base(str(tiny_llama)), "the cat", 8)


def test_serve_answers_each_adapter_as_generate_does(tiny_llama, tmp_path):
    openai = pytest.importorskip("openai")  # the test extra installs it
    dirs = {}
    for seed, method in enumerate(METHODS):
        loaded, spec = virtual_model(tiny_llama, method, 4, seed=seed)
        moved(loaded, seed=seed, std=1.0)
        save_adapters(tmp_path / method, loaded.model, spec, str(tiny_llama))
        dirs[method] = str(tmp_path / method)
    dirs["lora"] = str(make_adapter(tiny_llama, tmp_path / "lora", seed=1))
    names = [*dirs, str(tiny_llama)]
    expected = [complete(load_adapted(str(tiny_llama), dirs.get(name))[0], "the cat", 12)
                for name in names]
    assert len(set(expected)) == len(names)  # else serving the wrong one could pass
    with start_server(str(tiny_llama), dirs, port=0) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)

        def ask(name):
            return client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "the cat"}], max_tokens=12,
                temperature=0).choices[0].message.content

        with ThreadPoolExecutor(len(names)) as pool:  # their turns interleave
            assert list(pool.map(ask, names * 2)) == expected * 2


@pytest.mark.parametrize("settings, message", [
    (dict(fine_tune_type="prefix", grad_checkpoint=True), "--grad-checkpoint would drop"),
    (dict(fine_tune_type="prompt", targets="q_proj"), "--targets and --num-layers"),
    (dict(fine_tune_type="prompt", num_layers=1), "--targets and --num-layers"),
    (dict(fine_tune_type="lora", prompt_init_text="Add"), "--prompt-init-text sets"),
])
def test_settings_virtual_tokens_cannot_honor_are_refused(tiny_llama, tmp_path, settings,
                                                         message):
    run = Finetune(model=str(tiny_llama), data={"train": ROWS}, adapter_path=str(tmp_path),
                   **settings)
    with pytest.raises(UserError, match=message):
        run.train()


def test_fuse_and_gguf_refuse_in_one_line(tiny_llama, tmp_path):
    loaded, spec = virtual_model(tiny_llama, "prefix")
    save_adapters(tmp_path / "ours", loaded.model, spec, str(tiny_llama))
    result = CliRunner().invoke(cli, ["fuse", "--model", str(tiny_llama), "--adapter-path",
                                      str(tmp_path / "ours"), "--save-path", str(tmp_path / "f")])
    assert result.exit_code != 0 and "cannot be fused" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(UserError, match="holds LoRA only"):
        export_adapter(tmp_path / "ours", "gguf", tmp_path / "adapter.gguf")
