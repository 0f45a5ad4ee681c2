"""--report-to: what wandb and TensorBoard hold, read back by their own readers, equals
metrics.jsonl; the files stay under the adapter directory; a missing library or an unknown
service is one line before anything loads."""

import json
import struct
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import addition_rows
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto.wandb_internal_pb2 import Record

from mlx_lora import Finetune, UserError
from mlx_lora.cli import cli
from mlx_lora.config_file import read_config_file
from mlx_lora.formats.metrics import read_metrics

ROWS = addition_rows(6, 4)
SPLITS = {"train": ROWS[:16], "valid": ROWS[16:]}
SETTINGS = dict(iters=4, batch_size=4, learning_rate=5e-3, steps_per_report=1,
                steps_per_eval=2, save_every=2, val_batches=1, mask_prompt=True)


def run(tiny_llama, out: Path, **options):
    return Finetune(model=str(tiny_llama), data=SPLITS, adapter_path=str(out),
                    **{**SETTINGS, **options})


def logged_numbers(out: Path) -> dict[tuple[str, int], float]:
    """What a tracker should hold: every number of every train and val event, by tag and step."""
    return {(f"{r['event']}/{key}", r["step"]): value for r in read_metrics(out)
            if r["event"] in ("train", "val") for key, value in r.items()
            if key not in ("event", "step")}


def test_tensorboard_holds_the_metrics_after_a_crash_and_a_resume(tiny_llama, tmp_path):
    out = tmp_path / "run"

    def crash(event):
        if event["event"] == "train" and event["step"] == 3:  # after step 2's checkpoint
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        run(tiny_llama, out, report_to="tensorboard").train(callback=crash)
    crashed = EventAccumulator(str(out / "tensorboard"))
    crashed.Reload()  # the writer was closed on the way out: step 3 is on disk
    assert [e.step for e in crashed.Scalars("train/loss")] == [1, 2, 3]

    assert run(tiny_llama, out, report_to="tensorboard", resume=True).train().finished
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = [((tag, e.step), e.value) for tag in events.Tags()["scalars"]
           for e in events.Scalars(tag)]
    want = logged_numbers(out)  # the resumed run's steps 3 and 4 replaced the crashed one's
    assert len(got) == len(dict(got)) == len(want)
    assert dict(got) == pytest.approx(want, rel=1e-6)  # TensorBoard keeps float32
    assert {"train/loss", "train/learning_rate", "train/tokens_per_sec", "val/val_loss",
            "val/peak_memory_gb"} <= set(events.Tags()["scalars"])
    text = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert json.loads(text) == yaml.safe_load((out / "config.yaml").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def wandb_records(path: Path) -> list[Record]:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks, each with
    a 7-byte header: crc32, length, type) after a 7-byte file header, holding protobufs."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, at = [], b"", 7
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[at:at + 7])
        pending += data[at + 7:at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            records.append(Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_run_holds_the_metrics_and_config(tiny_llama, tmp_path, monkeypatch):
    home = tmp_path / "wandb-home"  # wandb's own logs and settings, kept out of ~
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_CACHE_DIR": home / "cache", "WANDB_CONFIG_DIR": home / "config",
                        "WANDB_DATA_DIR": home / "data"}.items():
        monkeypatch.setenv(name, str(value))
    out = tmp_path / "run"
    assert run(tiny_llama, out, report_to="wandb,tensorboard").train().finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "wandb-home"]
    assert (out / "tensorboard").is_dir()
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)

    [started] = [r.run for r in records if r.HasField("run")]
    assert started.project == started.display_name == "run"  # the adapter directory's name
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert {key: config[key] for key in resolved} == resolved

    history: dict[int, dict] = {}
    for r in records:
        if r.HasField("history"):
            row = history.setdefault(r.history.step.num, {})
            row.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in r.history.item})
    got = {(tag, step): value for step, row in history.items() for tag, value in row.items()
           if tag.startswith(("train/", "val/"))}
    assert got == logged_numbers(out)  # JSON both sides: exact


@pytest.mark.parametrize("service, module", [("wandb", "wandb"),
                                             ("tensorboard", "tensorboardX")])
def test_a_missing_library_is_one_line_before_anything_loads(service, module, tmp_path,
                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    no_model = tmp_path / "no-such-model"  # loading it first would be another error
    with pytest.raises(UserError) as error:
        Finetune(model=str(no_model), data=SPLITS, adapter_path=str(tmp_path / "run"),
                 report_to=f"{service}").train()
    assert str(error.value) == (f"--report-to {service} needs the {module} package: "
                                f"pip install 'mlx-lora[{service}]'")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_service_is_refused_with_the_choices(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="unknown service 'swanlab'; the choices are wandb, "
                                        "tensorboard"):
        Finetune(model=str(tiny_llama), data=SPLITS, report_to="wandb,swanlab")
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", "x",
                                      "--adapter-path", str(tmp_path / "run"),
                                      "--report-to", "swanlab"])
    assert result.exit_code == 2
    assert "unknown service 'swanlab'" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


CONFIG_FILES = {
    "mlx-lm's older wandb key": ({"wandb": "proj"},
                                 {"report_to": "wandb", "project_name": "proj"}),
    "wandb beside report_to": ({"wandb": "proj", "report_to": "tensorboard"},
                               {"report_to": "tensorboard,wandb", "project_name": "proj"}),
    "report_to and project_name": ({"report_to": "wandb,tensorboard", "project_name": "p"},
                                   {"report_to": "wandb,tensorboard", "project_name": "p"}),
    "mlx-lm's nulls": ({"wandb": None, "report_to": None, "project_name": None}, {}),
}


@pytest.mark.parametrize("keys, values", CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_config_file_logging_keys(keys, values, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(keys))
    assert read_config_file(str(tmp_path / "run.yaml")) == values


def test_config_file_wandb_and_project_name_must_agree(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"wandb": "a", "project_name": "b"}))
    with pytest.raises(UserError, match="'wandb' and 'project_name' name different projects"):
        read_config_file(str(tmp_path / "run.yaml"))
