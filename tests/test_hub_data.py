"""Hugging Face data sets train: as `datasets` saves them (save_to_disk), as Hub repos hold
them (parquet files), with mlx-lm's hf_dataset block; the Hub itself cannot be reached here,
so a Hub id is checked to reach load_dataset with the right arguments."""

import json
import sys

import datasets
import pytest

from mlx_lora import Finetune
from mlx_lora.config_file import read_config_file
from mlx_lora.data.hub import HubSplits, is_hub_data
from mlx_lora.data.sources import read_splits
from mlx_lora.errors import UserError

GSM8K = {"prompt": "question", "completion": "answer", "text": "text", "messages": "messages"}


@pytest.fixture(scope="module")
def gsm8k_rows(shared_data):
    path = shared_data / "grade-school-math" / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[:48]]


@pytest.fixture(scope="module")
def saved(gsm8k_rows, tmp_path_factory):
    """A DatasetDict written by save_to_disk, with the validation split most sets have."""
    path = tmp_path_factory.mktemp("hub") / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(gsm8k_rows[:40]),
                          "validation": datasets.Dataset.from_list(gsm8k_rows[40:])}
                         ).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def parquet_repo(gsm8k_rows, tmp_path_factory):
    """A directory laid out as a Hub data set repo: data/{split}-00000-of-00001.parquet."""
    path = tmp_path_factory.mktemp("hub") / "repo"
    (path / "data").mkdir(parents=True)
    for split, rows in (("train", gsm8k_rows[:40]), ("test", gsm8k_rows[40:])):
        datasets.Dataset.from_list(rows).to_parquet(
            str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return path


def test_saved_data_set_reads_its_splits_as_records(saved, gsm8k_rows):
    splits = read_splits(str(saved), GSM8K)
    assert {k: (name, len(r)) for k, (name, r) in splits.items()} == {
        "train": (f"{saved}:train", 40), "valid": (f"{saved}:validation", 8)}
    first = splits["train"][1][0]
    assert (first.prompt, first.completion) == (gsm8k_rows[0]["question"],
                                                gsm8k_rows[0]["answer"])
    assert first.source == f"{saved}:train[0]"


def test_parquet_repo_reads_splits_and_slices(parquet_repo):
    splits = read_splits(str(parquet_repo), GSM8K)
    assert {k: len(r) for k, (_, r) in splits.items()} == {"train": 40, "test": 8}
    sliced = read_splits(str(parquet_repo), GSM8K, HubSplits(train="train[:25%]",
                                                             valid="train[-10%:]"))
    assert {k: len(r) for k, (_, r) in sliced.items()} == {"train": 10, "valid": 4, "test": 8}
    one_file = parquet_repo / "data" / "train-00000-of-00001.parquet"
    assert is_hub_data(str(one_file))
    assert len(read_splits(str(one_file), GSM8K)["train"][1]) == 40


def test_bad_rows_are_named_by_split_and_index_with_the_mapping(saved):
    with pytest.raises(UserError) as e:
        read_splits(str(saved))
    assert str(e.value).startswith(f"{saved}:train[0]: no \"text\"")
    assert "--prompt-feature question --completion-feature answer" in str(e.value)


def test_missing_split_and_missing_library_are_one_line(saved, monkeypatch):
    with pytest.raises(UserError, match=r"no split 'dev' \(it has: train, validation\); name "
                                        "one with --valid-split"):
        read_splits(str(saved), GSM8K, HubSplits(valid="dev"))
    with pytest.raises(UserError, match="give the split's whole name"):
        read_splits(str(saved), GSM8K, HubSplits(train="train[:50%]"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"needs the datasets package: pip install "
                                        r"'mlx-lora\[datasets\]'"):
        read_splits(str(saved), GSM8K)


def test_a_hub_id_goes_to_load_dataset_with_its_configuration(parquet_repo, monkeypatch):
    calls = []
    real = datasets.load_dataset

    def offline_hub(path, name=None, **kwargs):  # the Hub, served from the local copy
        calls.append((path, name))
        return real(str(parquet_repo), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    assert is_hub_data("openai/gsm8k") and not is_hub_data("no/such/dir")
    splits = read_splits("openai/gsm8k", GSM8K, HubSplits(config="main"))
    assert calls == [("openai/gsm8k", "main")]
    assert splits["train"][0] == "openai/gsm8k:train"


def test_mlx_lm_hf_dataset_block_becomes_our_keys(tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text("hf_dataset:\n  path: openai/gsm8k\n  config: {name: main}\n"
                      "  train_split: train[:90%]\n  valid_split: train[-10%:]\n"
                      "  prompt_feature: question\n  completion_feature: answer\n")
    assert read_config_file(str(config)) == {
        "data": "openai/gsm8k", "dataset_config": "main", "train_split": "train[:90%]",
        "valid_split": "train[-10%:]", "prompt_feature": "question",
        "completion_feature": "answer"}
    config.write_text("hf_dataset:\n  path: a/b\n  streaming: true\n")
    with pytest.raises(UserError, match="unknown key 'hf_dataset.streaming'"):
        read_config_file(str(config))


def test_a_saved_data_set_trains_from_the_api(saved, tiny_llama, tmp_path):
    run = Finetune(model=str(tiny_llama), data=str(saved), adapter_path=str(tmp_path / "out"),
                   prompt_feature="question", completion_feature="answer", iters=4,
                   batch_size=4, steps_per_eval=4, val_batches=1, max_seq_length=128,
                   learning_rate=1e-3)
    losses = []
    result = run.train(callback=lambda e: losses.append(e["val_loss"]) if "val_loss" in e
                       else None)
    assert result.finished and losses[-1] < losses[0]
    assert run.evaluate(split="valid")["records"] == 8


def test_eval_reads_a_split_of_a_hub_data_set(parquet_repo, tiny_llama):
    from click.testing import CliRunner

    from mlx_lora.cli import cli

    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--data",
                                      str(parquet_repo), "--split", "test", "--json",
                                      "--prompt-feature", "question",
                                      "--completion-feature", "answer"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["records"] == 8
