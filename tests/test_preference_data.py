"""Preference records: every accepted shape, shared prompts with no loss, FILE:LINE problems."""

import json

import numpy as np
import pytest

from mlx_lora.config import TrainConfig
from mlx_lora.data.records import read_records, records_from_objects
from mlx_lora.errors import UserError
from mlx_lora.model.load import load_tokenizer_only
from mlx_lora.objectives.pairs import to_pairs

DPO = TrainConfig(train_mode="dpo", max_seq_length=256)
USER = {"role": "user", "content": "Name a colour."}
SHAPES = {
    "strings": {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    "strings with system": {"system": "Be brief.", "prompt": "Name a colour.",
                            "chosen": "Blue.", "rejected": "Seven."},
    "conversational": {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Blue."}],
                       "rejected": [{"role": "assistant", "content": "Seven."}]},
    "implicit prompt": {"chosen": [USER, {"role": "assistant", "content": "Blue."}],
                        "rejected": [USER, {"role": "assistant", "content": "Seven."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a colour."}],
                 "chosen": {"from": "gpt", "value": "Blue."},
                 "rejected": {"from": "gpt", "value": "Seven."}},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_gives_two_halves_sharing_an_unlearned_prompt(shape, tiny_llama):
    tokenizer = load_tokenizer_only(str(tiny_llama))
    (record,) = records_from_objects([SHAPES[shape]], "train")
    assert record.kind == "preference"
    (pair,) = to_pairs([record], tokenizer, DPO, "train")
    first = [int(np.argmax(e.mask)) for e in (pair.chosen, pair.rejected)]
    assert first[0] == first[1] > 0  # the prompt is the same length in both, and carries no loss
    np.testing.assert_array_equal(pair.chosen.ids[:first[0]], pair.rejected.ids[:first[0]])
    texts = [tokenizer.decode(e.ids[e.mask].tolist()) for e in (pair.chosen, pair.rejected)]
    assert texts[0].startswith("Blue.") and texts[1].startswith("Seven.")
    if "system" in shape:
        assert "Be brief." in tokenizer.decode(pair.chosen.ids.tolist())


def test_earlier_assistant_turns_of_the_prompt_carry_no_loss(tiny_llama):
    tokenizer = load_tokenizer_only(str(tiny_llama))
    turns = [USER, {"role": "assistant", "content": "Red."},
             {"role": "user", "content": "Another."}]
    (record,) = records_from_objects([{"prompt": turns, "chosen": "Blue.",
                                       "rejected": "Seven."}], "train")
    (pair,) = to_pairs([record], tokenizer, DPO, "train")
    learned = tokenizer.decode(pair.chosen.ids[pair.chosen.mask].tolist())
    assert "Blue." in learned and "Red." not in learned


def test_llama_factory_demo_file_reads_as_pairs(shared_data, tiny_llama):
    path = shared_data / "llama-factory" / "dpo_en_demo.json"
    records = read_records(path)
    assert len(records) == 300 and {r.kind for r in records} == {"preference"}
    starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"]
    assert [r.source for r in records] == [f"dpo_en_demo.json:{n}" for n in starts]
    pairs = to_pairs(records[:20], load_tokenizer_only(str(tiny_llama)),
                     TrainConfig(train_mode="dpo", max_seq_length=4096), "dpo_en_demo.json")
    assert len(pairs) == 20


BAD = [
    ({"prompt": "p", "chosen": 3, "rejected": "r"},
     'train.json:2: "chosen" must be a string or a list of messages'),
    ({"conversations": [{"from": "robot", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}},
     'train.json:2: conversations[0] has an unknown "from" "robot"'),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     'train.json:2: no "prompt", and "chosen" and "rejected" share no first message'),
    ({"prompt": [USER], "chosen": [{"role": "user", "content": "x"}], "rejected": "r"},
     'train.json:2: "chosen" has no assistant message'),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "system": 5},
     'train.json:2: "system" must be a non-empty string'),
    ({"prompt": "p", "chosen": "c", "rejected": " "},
     'train.json:2: rejected: "completion" is empty'),
]


@pytest.mark.parametrize("record,message", BAD, ids=[m.split(": ", 1)[1][:30] for _, m in BAD])
def test_bad_pairs_are_reported_by_file_and_line(record, message, tmp_path):
    path = tmp_path / "train.json"
    path.write_text("[\n" + json.dumps(record) + "\n]\n")
    with pytest.raises(UserError) as error:
        read_records(path)
    assert str(error.value).startswith(message), str(error.value)


def test_objective_and_records_must_agree(tiny_llama):
    tokenizer = load_tokenizer_only(str(tiny_llama))
    chat = records_from_objects([{"messages": [USER, {"role": "assistant", "content": "x"}]}],
                                "train")
    with pytest.raises(UserError, match=r"train\[0\]: a chat record, but --train-mode dpo"):
        to_pairs(chat, tokenizer, DPO, "train")
    from mlx_lora.data.tokenize import to_examples
    pairs = records_from_objects([SHAPES["strings"]], "train")
    with pytest.raises(UserError, match=r"train\[0\]: a preference pair .* --train-mode dpo"):
        to_examples(pairs, tokenizer, 256, True, "train")
