"""Evaluation: the loss is the token-weighted mean over the whole split; accuracy is exact match."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_lora.cli import cli
from mlx_lora.data.records import read_records
from mlx_lora.data.tokenize import load_split
from mlx_lora.errors import UserError
from mlx_lora.evaluate import evaluate, generation_task
from mlx_lora.model.load import load_base

COMPLETIONS = [
    {"prompt": "What is the capital of France?", "completion": "Paris"},
    {"prompt": "How many legs does a spider have?", "completion": "eight legs"},
    {"prompt": "Translate to French: good morning.", "completion": "Bonjour."},
    {"prompt": "The cat sat on the", "completion": "mat and looked at the bird."},
    {"prompt": "Summarize the text.", "completion": "The meeting moved to Friday."},
]
CHATS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris"}]},
    {"messages": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "red ball"}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", COMPLETIONS)
    write_jsonl(tmp_path / "valid.jsonl", CHATS)
    write_jsonl(tmp_path / "test.jsonl", COMPLETIONS)
    return tmp_path


def reference_loss(model, examples) -> tuple[float, int]:
    """Token-weighted mean cross-entropy, one unpadded example at a time."""
    total, count = 0.0, 0
    for example in examples:
        logits = model(mx.array(example.ids[:-1])[None])[0].astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, mx.array(example.ids[1:]))
        mask = mx.array(example.mask[1:].astype(np.float32))
        total += (ce * mask).sum().item()
        count += int(example.mask[1:].sum())
    return total / count, count


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_loss_is_token_weighted_over_the_whole_split(tiny_llama, data_dir, mask_prompt):
    loaded = load_base(str(tiny_llama))
    examples = load_split(data_dir / "test.jsonl", loaded.tokenizer, 2048, mask_prompt)
    expected, count = reference_loss(loaded.model, examples)
    for batch_size in (1, 2, 8):  # padding and batch boundaries change nothing
        result = evaluate(loaded, data_dir / "test.jsonl", batch_size=batch_size,
                          mask_prompt=mask_prompt)
        assert result.loss == pytest.approx(expected, rel=1e-5)
        assert result.tokens == count and result.records == len(COMPLETIONS)
        assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
        assert result.accuracy is None


def make_bigram(loaded, chains: dict[int, int]) -> None:
    """Make greedy decoding a lookup: after token t comes chains[t].

    With every block's output projection zeroed the residual stream is the current token's
    embedding, so the logits depend on that token alone; lm_head row chains[t] is t's
    normalized embedding, which scores highest against t's own (cosine 1).
    """
    model = loaded.model
    for layer in model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    embed = model.model.embed_tokens.weight
    unit = embed / mx.linalg.norm(embed, axis=-1, keepdims=True)
    head = mx.zeros_like(model.lm_head.weight)
    for t, nxt in chains.items():
        head[nxt] = unit[t]
    model.lm_head.weight = head


def test_exact_match_of_greedy_generations(tiny_llama, data_dir):
    loaded = load_base(str(tiny_llama))
    tokenizer = loaded.tokenizer
    target = read_records(data_dir / "test.jsonl")[0]  # "Paris"
    prompt, reference = generation_task(target, tokenizer)
    chain = [prompt[-1], *reference, tokenizer.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1  # a lookup table needs distinct keys
    make_bigram(loaded, dict(zip(chain[:-1], chain[1:], strict=True)))
    # Every prompt ends with the same assistant header, so every answer is "Paris".
    result = evaluate(loaded, data_dir / "test.jsonl", generate=-1)
    assert (result.accuracy, result.generated) == (1 / len(COMPLETIONS), len(COMPLETIONS))
    # Chats are judged on their last assistant turn: the first chat's is "Paris".
    result = evaluate(loaded, data_dir / "valid.jsonl", split="valid", generate=1)
    assert (result.accuracy, result.generated) == (1.0, 1)
    result = evaluate(loaded, data_dir / "valid.jsonl", split="valid", generate=-1)
    assert (result.accuracy, result.generated) == (0.5, 2)


def test_generation_prompt_is_the_rendered_conversation_up_to_the_last_answer(tiny_llama,
                                                                               data_dir):
    tokenizer = load_base(str(tiny_llama)).tokenizer
    chat = read_records(data_dir / "valid.jsonl")[0]
    prompt, reference = generation_task(chat, tokenizer)
    messages = list(chat.messages)
    head = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer.decode(prompt) == head
    assert tokenizer.decode(reference).strip() == "Paris"


def test_eval_cli_json_is_the_last_stdout_line(tiny_llama, data_dir):
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--data",
                                      str(data_dir), "--json", "--generate", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["split"] == "test" and report["records"] == len(COMPLETIONS)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["generated"] == 2 and 0 <= report["accuracy"] <= 1
    assert len(result.stdout.strip().splitlines()) == 1  # the human lines went to stderr
    plain = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--data",
                                     str(data_dir), "--json"])
    assert set(json.loads(plain.stdout)) == {"split", "loss", "perplexity", "tokens", "records"}


def test_eval_cli_errors(tiny_llama, data_dir, tmp_path):
    (data_dir / "test.jsonl").unlink()
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--data",
                                      str(data_dir)])
    assert result.exit_code == 2 and "no test.jsonl" in result.output
    text = write_jsonl(tmp_path / "plain.jsonl", [{"text": "Once upon a time."}])
    with pytest.raises(UserError, match="no reference answer"):
        evaluate(load_base(str(tiny_llama)), text, generate=1)
