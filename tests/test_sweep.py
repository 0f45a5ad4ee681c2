"""mlx-lora sweep: the grid, every combination as a real run, the table, rerun and resume."""

import dataclasses
import json
import statistics
import threading

import pytest
import yaml
from click.testing import CliRunner
from helpers import addition_rows

from mlx_lora import Finetune, UserError
from mlx_lora.cli import cli
from mlx_lora.formats.metrics import read_metrics
from mlx_lora.sweep import parse_grid, ranked, run_sweep

ROWS = addition_rows(9, 5)
BASE = dict(iters=4, batch_size=4, steps_per_report=1, steps_per_eval=2, save_every=2,
            mask_prompt=True, seed=0)
GRID = ["learning-rate=1e-3,1e-2"]
NAMES = ["learning_rate=1e-3", "learning_rate=1e-2"]


@pytest.fixture(scope="module")
def base_config(tiny_llama, tmp_path_factory):
    """A base config file over a tiny llama and a prompt/completion task with a valid split."""
    root = tmp_path_factory.mktemp("sweep")
    data = root / "data"
    data.mkdir()
    for split, rows in (("train", ROWS[:36]), ("valid", ROWS[36:])):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_llama), "data": str(data), **BASE}))
    return path


@pytest.fixture(scope="module")
def swept(base_config):
    """A finished two-run sweep through the API, and its result."""
    out = base_config.parent / "out"
    return out, run_sweep(str(base_config), GRID, out, {})


def sweep_cli(base_config, out, *extra):
    return CliRunner().invoke(cli, ["sweep", "--config", str(base_config), *sum(
        (["--grid", g] for g in GRID), []), "--output", str(out), *map(str, extra)])


def test_grid_values_take_their_fields_types_and_spellings():
    grid = parse_grid(["learning-rate=1e-4, 3e-4", "rank=8,16", "rslora=true,no",
                       "train_type=lora,dora", "targets=all-linear"])
    assert {key: [value for _, value in values] for key, values in grid.items()} == {
        "learning_rate": [1e-4, 3e-4], "rank": [8, 16], "rslora": [True, False],
        "fine_tune_type": ["lora", "dora"], "targets": ["all-linear"]}
    assert [text for text, _ in grid["learning_rate"]] == ["1e-4", "3e-4"]


@pytest.mark.parametrize("spec, says", [
    ("rank=8,8.5", "rank=8.5: rank takes an int"),
    ("learning_rate=1e-4,fast", "learning_rate=fast: learning_rate takes a float"),
    ("learning_rate=inf", "learning_rate=inf: learning_rate takes a finite number"),
    ("grad_checkpoint=maybe", "grad_checkpoint=maybe: grad_checkpoint takes true or false"),
    ("optimizer=sgd", "optimizer=sgd: optimizer is one of adam, adamw"),
    ("rnak=8", "rnak: unknown key 'rnak' (did you mean 'rank'?"),
    ("adapter_path=a,b", "adapter_path: not sweepable"),
    ("data=a,b", "data: not sweepable: losses on different data do not compare"),
    ("rank", "'rank': expected KEY=VALUE,VALUE"),
    ("rank=8,", "rank=: each value names a run's directory"),
    ("targets=re:a/b", "targets=re:a/b: each value names a run's directory"),
    ("learning_rate=1e-4,0.0001", "learning_rate=1e-4,0.0001: a value is given twice"),
])
def test_a_bad_grid_is_refused_in_one_line_naming_key_and_value(spec, says):
    with pytest.raises(UserError) as error:
        parse_grid([spec])
    assert str(error.value).startswith(f"--grid {says}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("args, says", [
    (["--grid", "rank=8,0"], "--grid rank=0: "),  # a range the config checks, per combination
    (["--grid", "rank=4", "--rank", "8"], "--rank is set, but the sweep sets rank itself"),
])
def test_bad_combinations_fail_in_one_line_before_anything_trains(base_config, tmp_path, args,
                                                                  says):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["sweep", "--config", str(base_config), *args,
                                      "--output", str(out)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {says}")
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_every_combination_finishes_in_its_own_directory_with_its_values(swept):
    out, result = swept
    assert result.finished
    for name, learning_rate in zip(NAMES, (1e-3, 1e-2), strict=True):
        assert read_metrics(out / name)[-1]["event"] == "done"
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        assert config["learning_rate"] == learning_rate and config["adapter_path"] == str(
            out / name)
        assert config["iters"] == BASE["iters"]  # the base config reached every run


def test_the_table_is_best_first_and_its_numbers_are_the_runs_metrics(swept):
    out, result = swept
    table = json.loads((out / "sweep.json").read_text())
    losses = [row["val_loss"] for row in table["runs"]]
    assert losses == sorted(losses) and table["best"] == table["runs"][0]["name"]
    assert {row["name"] for row in table["runs"]} == set(NAMES)
    for row in table["runs"]:
        events = read_metrics(out / row["name"])
        train = [e for e in events if e["event"] == "train"]
        assert row["val_loss"] == min(e["val_loss"] for e in events if e["event"] == "val")
        assert row["tokens_per_sec"] == statistics.median(e["tokens_per_sec"] for e in train)
        assert row["peak_memory_gb"] == max(e["peak_memory_gb"] for e in events
                                            if "peak_memory_gb" in e)
        assert row["step"] == BASE["iters"]
    lines = (out / "sweep.md").read_text().splitlines()
    assert lines[0].startswith("| learning_rate | val loss | tokens/s | peak memory (GB)")
    for line, row in zip(lines[2:], table["runs"], strict=True):
        assert line.startswith(f"| {row['name'].split('=')[1]} | {row['val_loss']:.4f} |")
    assert (out / "sweep.md").read_text() == result.table


def test_runs_without_validation_rank_last(swept):
    rows = swept[1].rows
    unvalidated = dataclasses.replace(rows[0], val_loss=None)
    assert ranked([unvalidated, rows[1]]) == [rows[1], unvalidated]


def test_best_yaml_is_the_best_runs_config_and_train_takes_it(swept):
    out, result = swept
    best = out / "best.yaml"
    assert result.best_config == best
    config = yaml.safe_load(best.read_text())
    assert config == yaml.safe_load((result.rows[0].run.adapter_dir / "config.yaml").read_text())
    assert Finetune(config=str(best)).config.learning_rate == config["learning_rate"]


def test_a_rerun_skips_finished_runs_and_prints_the_table(swept, base_config):
    out, _ = swept
    before = {name: (out / name / "metrics.jsonl").read_bytes() for name in NAMES}
    result = sweep_cli(base_config, out)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("finished before, skipped") == 2
    assert result.stdout.startswith((out / "sweep.md").read_text())
    assert {name: (out / name / "metrics.jsonl").read_bytes() for name in NAMES} == before


def test_an_interrupted_sweep_resumes_its_run_instead_of_restarting_it(base_config, tmp_path):
    out = tmp_path / "out"
    stop = threading.Event()
    stopped = run_sweep(str(base_config), GRID, out, {}, stop=stop,
                        callback=lambda e: stop.set() if e.get("step") == 2 else None)
    assert not stopped.finished and not (out / NAMES[1]).exists()
    partial = read_metrics(out / NAMES[0])
    assert partial[-1]["step"] == 2 and all(e["event"] != "done" for e in partial)

    result = sweep_cli(base_config, out)
    assert result.exit_code == 0, result.output
    assert "run 1 of 2: learning_rate=1e-3 (continuing where it stopped)" in result.stderr
    assert "(step 2)" in result.stderr  # train's own "resuming from ... (step 2)"
    resumed = read_metrics(out / NAMES[0])
    # The same lines, timings included: continued from step 2, not run again from step 0.
    assert resumed[:len(partial)] == partial
    assert [e["step"] for e in resumed if e["event"] == "train"] == [1, 2, 3, 4]
    assert resumed[-1]["event"] == "done" and read_metrics(out / NAMES[1])[-1]["event"] == "done"
