"""Data-parallel training on two local processes (MLX's ring backend) against one process.

Each multi-process run starts its ranks here, with MLX_RANK and a hostfile as mlx.launch sets
them (one run goes through mlx.launch itself, whose exit status is 0 whatever its ranks did),
and checks every process's own exit status and output. The processes run
tests/distributed_worker.py: the CLI under an audit hook that lists what each process wrote.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import addition_rows, write_splits

from mlx_lora.config import TrainConfig
from mlx_lora.data.stream import Part, Standin, training_batches
from mlx_lora.data.tokenize import Example
from mlx_lora.formats.metrics import read_metrics
from mlx_lora.objectives.pairs import Pair, pair_batches
from mlx_lora.objectives.sft import SFT
from mlx_lora.train.checkpoint import list_checkpoints
from mlx_lora.train.distributed import Ranks, ranked
from mlx_lora.train.run import train

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "distributed_worker.py"
# 33 records in batches of 8: every epoch ends with a one-record batch, which leaves the
# second rank a stand-in; 9 validation records: an evaluation batch of one, likewise.
ROWS = addition_rows(9, 5)
SETTINGS = dict(iters=6, batch_size=8, learning_rate=5e-3, steps_per_report=1,
                steps_per_eval=3, save_every=3, lr_schedule="cosine", warmup=2,
                mask_prompt=True)
TOLERANCE = 1e-5
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("data"), {"train": ROWS[:33], "valid": ROWS[36:]})


def flags(model, data, out, **extra) -> list[str]:
    settings = {**SETTINGS, **extra}
    args = ["train", "--model", str(model), "--data", str(data), "--adapter-path", str(out)]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [] if value is False else [flag, str(value)]
    return args


@pytest.fixture(scope="module")
def reference(tiny_llama, data, tmp_path_factory) -> Path:
    """The run in this one process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(TrainConfig(model=str(tiny_llama), data=str(data), adapter_path=str(out), **SETTINGS))
    return out


def free_ports(n: int) -> list[int]:
    """n consecutive free ports on 127.0.0.1 (mlx.launch takes the first)."""
    for _ in range(200):
        start = random.randrange(20000, 60000)
        sockets = []
        try:
            for port in range(start, start + n):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
            return list(range(start, start + n))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports")


def start(args: list[str], logs: Path, ranks: int = 2,
          cwds: list[Path] | None = None) -> list[subprocess.Popen]:
    """The worker on `ranks` processes of MLX's ring backend, each logging to logs/rank-N
    (and working in cwds[N], as if on machines of its own)."""
    logs.mkdir(parents=True, exist_ok=True)
    hostfile = logs / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
    processes = []
    for rank in range(ranks):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        with open(logs / f"rank-{rank}", "w") as log:
            processes.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                                              stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT,
                                              cwd=cwds[rank] if cwds else None))
    return processes


def finish(processes: list[subprocess.Popen], logs: Path, timeout: float = 120) -> list[dict]:
    """Each process's exit status, output and written paths, once all have ended."""
    deadline = time.monotonic() + timeout
    for process in processes:
        process.wait(timeout=max(deadline - time.monotonic(), 1))
    return [dict(status=p.returncode, **outcome((logs / f"rank-{rank}").read_text(), rank))
            for rank, p in enumerate(processes)]


def outcome(output: str, rank: int) -> dict:
    """What the worker's status line says of one rank, and the rest of its output.

    wrote: the paths it wrote and left (Python's imports write bytecode caches, and
    tempfile.gettempdir() probes the temp directory with a file it removes at once).
    """
    lines = [line for line in output.splitlines() if line.startswith(f"RANK {rank} EXIT ")]
    assert len(lines) == 1, output
    _, _, _, code, paths = lines[0].split(" ", 4)
    paths = json.loads(paths)
    left = [p for p in paths["wrote"] if p not in paths["removed"] and p != os.devnull
            and "__pycache__" not in p]
    rest = output.replace(lines[0], "").strip()
    return dict(exit=int(code), wrote=left, touched=paths["wrote"] + paths["removed"],
                output=rest)


def adapters(out: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)).max())
               for k in a)


def losses(out: Path) -> dict[tuple[str, int], float]:
    return {(r["event"], r["step"]): r.get("loss", r.get("val_loss")) for r in read_metrics(out)
            if r["event"] in ("train", "val")}


def assert_same_run(out: Path, reference: Path) -> None:
    assert largest_difference(adapters(out), adapters(reference)) <= TOLERANCE
    got, want = losses(out), losses(reference)
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) <= TOLERANCE


def test_mlx_launch_two_processes_train_as_one(tiny_llama, data, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launch.log"
    launcher = Path(sys.executable).with_name("mlx.launch")
    command = [str(launcher), "--backend", "ring", "-n", "2", "--starting-port",
               str(free_ports(2)[0]), "--", sys.executable, str(WORKER),
               *flags(tiny_llama, data, out)]
    with open(log, "w") as output:
        subprocess.run(command, stdin=subprocess.DEVNULL, stdout=output,
                       stderr=subprocess.STDOUT, timeout=180, check=False)
    text = log.read_text()
    first, second = outcome(text, 0), outcome(text, 1)
    assert first["exit"] == 0 and second["exit"] == 0, text
    assert "[WARN]" not in text, text  # mlx.launch's word for a rank that failed
    assert_same_run(out, reference)
    assert any(Path(p).is_relative_to(out) for p in first["wrote"])  # the hook sees writes
    assert second["wrote"] == []  # rank 1 left no file anywhere,
    assert not any(Path(p).is_relative_to(tmp_path) for p in second["touched"])  # nor came here


@pytest.fixture(scope="module")
def sharded(tiny_llama, data, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The run on two processes, the optimizer state sharded over them."""
    root = tmp_path_factory.mktemp("sharded")
    processes = start(flags(tiny_llama, data, root / "run", shard_optimizer=True), root / "logs")
    return root / "run", finish(processes, root / "logs")


def test_sharded_optimizer_trains_as_one_process(sharded, reference):
    out, (first, second) = sharded
    assert first["status"] == second["status"] == 0, (first, second)
    assert_same_run(out, reference)
    # The checkpoint holds the whole state, as one process's checkpoint does.
    name = "step-00000006/optimizer.safetensors"
    got = mx.load(str(out / "checkpoints" / name))
    want = mx.load(str(reference / "checkpoints" / name))
    assert largest_difference({k: np.array(v) for k, v in got.items()},
                              {k: np.array(v) for k, v in want.items()}) <= TOLERANCE
    line = next(s for s in first["output"].splitlines() if s.startswith("optimizer state:"))
    held, unsharded = (float(n) * UNITS[unit] for n, unit in re.findall(r"([\d.]+) (\w+iB)", line))
    assert held == pytest.approx(unsharded / 2, rel=0.01)  # 16,384 parameters: no padding
    assert second["output"] == "" and second["wrote"] == []  # only rank 0 prints and writes


def test_full_fine_tune_sharded_trains_as_one_process(tiny_llama, data, tmp_path):
    settings = dict(fine_tune_type="full", learning_rate=1e-3, iters=4, steps_per_eval=2,
                    save_every=2)
    alone = tmp_path / "alone"
    train(TrainConfig(model=str(tiny_llama), data=str(data), adapter_path=str(alone),
                      **{**SETTINGS, **settings}))
    out, logs = tmp_path / "run", tmp_path / "logs"
    first, second = finish(start(flags(tiny_llama, data, out, shard_optimizer=True,
                                       **settings), logs), logs)
    assert first["status"] == second["status"] == 0, (first, second)
    assert_same_run(out, alone)
    assert "per rank, sharded over 2" in first["output"]


def truncate_to(out: Path, step: int) -> None:
    """As if the run had been killed right after its checkpoint of `step`."""
    for checkpoint in list_checkpoints(out):
        if checkpoint.name != f"step-{step:08d}":
            shutil.rmtree(checkpoint)


def test_resume_with_another_number_of_processes(sharded, reference, tiny_llama, data,
                                                 tmp_path):
    # Two sharded processes stopped at step 3, resumed by one process...
    one = tmp_path / "one"
    shutil.copytree(sharded[0], one)
    truncate_to(one, 3)
    train(TrainConfig(model=str(tiny_llama), data=str(data), adapter_path=str(one),
                      **SETTINGS), resume=True)
    assert_same_run(one, reference)
    # ... and one process stopped at step 3, resumed by two.
    two = tmp_path / "two"
    shutil.copytree(reference, two)
    truncate_to(two, 3)
    results = finish(start([*flags(tiny_llama, data, two), "--resume"], tmp_path / "logs"),
                     tmp_path / "logs")
    assert [r["status"] for r in results] == [0, 0], results
    assert_same_run(two, reference)


def test_sharded_state_updates_as_the_unsharded_state(tmp_path):
    hostfile, processes = tmp_path / "hosts.json", []
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(2)]))
    for rank in range(2):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        processes.append(subprocess.Popen([sys.executable, str(TESTS / "sharded_worker.py")],
                                          env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    for rank, (stdout, _) in enumerate(outputs):
        found = json.loads(stdout.strip().splitlines()[-1])
        assert (found["rank"], found["size"]) == (rank, 2)
        for name, case in found["cases"].items():
            assert case["params"] == 0.0 and case["resumed"] == 0.0, name  # exactly equal
            assert case.get("state", 0.0) == 0.0, name  # rank 0's gathered whole state
            assert case["bytes"] < 0.6 * case["plain_bytes"], name


def test_ctrl_c_on_one_rank_stops_both_at_one_step(tiny_llama, data, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    processes = start(flags(tiny_llama, data, out, iters=500, steps_per_eval=0,
                            save_every=1000), logs)
    wait_for_step(out, 2, processes)
    processes[1].send_signal(signal.SIGINT)  # the second rank only
    first, second = finish(processes, logs, timeout=60)
    assert first["status"] == second["status"] == 130, (first, second)
    steps = [c.name for c in list_checkpoints(out)]
    assert len(steps) == 1 and f"after step {int(steps[0][5:])}:" in first["output"]
    assert second["wrote"] == []


def wait_for_step(out: Path, step: int, processes) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        if (out / "metrics.jsonl").exists() and any(
                r["event"] == "train" and r["step"] >= step for r in read_metrics(out)):
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {step}")


def test_a_rank_that_dies_ends_the_other(tiny_llama, data, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    processes = start(flags(tiny_llama, data, out, iters=500, steps_per_eval=0), logs)
    wait_for_step(out, 2, processes)
    processes[1].kill()
    processes[1].wait()
    processes[0].wait(timeout=30)  # not left waiting for its partner
    assert processes[0].returncode != 0
    # Rank 0 refusing its output directory before training ends rank 1 too.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    results = finish(start(flags(tiny_llama, data, foreign), tmp_path / "logs2"),
                     tmp_path / "logs2", timeout=60)
    assert results[0]["status"] == 2 and "holds files mlx-lora did not write" in results[0][
        "output"]
    assert results[1]["status"] != 0 and results[1]["wrote"] == []


def test_a_rank_with_other_data_refuses_to_train(tiny_llama, data, tmp_path):
    machines = [tmp_path / "first", tmp_path / "second"]
    for machine, rows in zip(machines, (ROWS[:33], ROWS[1:34]), strict=True):
        shutil.copytree(data, machine / "data")  # each machine's own copy of --data ...
        (machine / "data" / "train.jsonl").write_text(  # ... the second's one record off
            "".join(json.dumps(r) + "\n" for r in rows))
    args = flags(tiny_llama, "data", "out")
    results = finish(start(args, tmp_path / "logs", cwds=machines), tmp_path / "logs")
    assert [r["status"] for r in results] == [2, 2], results
    assert "rank 1 read other data or another model than rank 0" in results[0]["output"]
    assert not (machines[0] / "out" / "adapters.safetensors").exists()


def test_divergence_stops_every_rank_at_the_same_step(tiny_llama, data, tmp_path):
    results = finish(start(flags(tiny_llama, data, tmp_path / "run", learning_rate=1e30,
                                 iters=20, steps_per_eval=0), tmp_path / "logs"),
                     tmp_path / "logs")
    assert [r["status"] for r in results] == [2, 2], results
    messages = [line for r in results for line in r["output"].splitlines()
                if line.startswith("error: ")]
    assert len(messages) == 2 and messages[0] == messages[1]  # same step, same reason
    assert "is not finite" in messages[0]


def shares(stream, steps: int) -> list:
    return [next(stream)[2] for _ in range(steps)]


def rows_of(batch) -> list[tuple]:
    """A batch's rows as token tuples (padding cut off)."""
    rows = batch.rows if hasattr(batch, "rows") else batch
    return [tuple(r[:n]) for r, n in zip(rows.inputs.tolist(), rows.lengths, strict=True)]


@pytest.mark.parametrize("kind", ["padded", "packed", "pairs"])
def test_ranks_read_disjoint_shares_that_cover_each_batch(kind):
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(3, 500, int(n)).astype(np.int32), np.ones(int(n), bool))
                for n in rng.integers(8, 60, 41)]
    # 41 records in batches of 4 end each epoch with a batch of one; packed, about two
    # records fill a row, so a batch has about two rows: fewer than the three ranks.
    config = TrainConfig(batch_size=4, max_seq_length=128, seed=3)
    if kind == "pairs":
        items = [Pair(a, b) for a, b in zip(examples, examples[1:] + examples[:1], strict=True)]
        make = lambda part: pair_batches(items, config, False, part=part)  # noqa: E731
    else:
        items = examples
        make = lambda part: training_batches(items, config, kind == "packed",  # noqa: E731
                                             part=part)
    steps = 12  # more than an epoch: its last, short batch included
    whole = shares(make(Part()), steps)
    parts = [shares(make(Part(rank, 3)), steps) for rank in range(3)]
    standins = 0
    for index, batch in enumerate(whole):
        own = [p[index] for p in parts if not isinstance(p[index], Standin)]
        standins += 3 - len(own)
        read = [row for b in own for row in rows_of(b)]
        assert sorted(read) == sorted(rows_of(batch))  # disjoint, and together the batch
    assert standins > 0  # the short batches left some rank nothing of its own
    objective = ranked(SFT, Ranks(2, 3))
    standin = next(p[i] for p in parts for i in range(steps) if isinstance(p[i], Standin))
    if kind != "pairs":
        assert objective.count(standin) == 0 and objective.arrays(standin)[0].item() == 0.0
