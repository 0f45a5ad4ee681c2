"""The memory guard: a run past --memory-limit stops with a checkpoint and a one-line message,
and resumes to the uninterrupted run's result; the limit's default, the advice, MLX's limits."""

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from test_distributed import finish, flags, start

from mlx_lora.cli import cli
from mlx_lora.config import TrainConfig, build_config
from mlx_lora.errors import UserError
from mlx_lora.formats.metrics import read_metrics
from mlx_lora.train.checkpoint import list_checkpoints
from mlx_lora.train.memory_guard import (
    GB,
    MemoryGuard,
    advice,
    default_limit,
    machine_memory,
    resolve_limit,
)


def cli_args(model, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--adapter-path", str(out),
            "--iters", "6", "--batch-size", "4", "--learning-rate", "5e-3",
            "--steps-per-report", "1", "--steps-per-eval", "3", "--save-every", "3",
            "--dropout", "0.1", "--lr-schedule", "cosine", "--warmup", "2", "--mask-prompt",
            *extra]


def train_losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if r["event"] == "train"}


def cache_limit() -> int:
    """MLX's cache limit (MLX has no getter: set it and put it back)."""
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = CliRunner().invoke(cli, cli_args(tiny_llama, data, out))
    assert result.exit_code == 0, result.output
    return out


def test_a_step_past_the_limit_stops_with_a_checkpoint_and_resumes(tiny_llama, data,
                                                                   uninterrupted, tmp_path):
    peak = max(r["peak_memory_gb"] for r in read_metrics(uninterrupted) if r["event"] == "train")
    low = f"{peak / 2:g}"  # above the weights and optimizer state, below a step
    out, limits = tmp_path / "run", (mx.get_memory_limit(), cache_limit())
    stopped = CliRunner().invoke(cli, cli_args(tiny_llama, data, out, "--memory-limit", low))
    assert stopped.exit_code == 2, stopped.output
    message = stopped.output.strip().splitlines()[-1]
    assert message.startswith("error: step 1 peaked at ") and f"--memory-limit {low} GB" in message
    assert "--grad-checkpoint" in message and "--batch-size (now 4" in message
    assert "Traceback" not in stopped.output
    assert [c.name for c in list_checkpoints(out)] == ["step-00000001"]
    assert "done" not in [r["event"] for r in read_metrics(out)]
    assert (mx.get_memory_limit(), cache_limit()) == limits  # MLX's own, put back

    resumed = CliRunner().invoke(cli, cli_args(tiny_llama, data, out, "--resume",
                                               "--memory-limit", f"{peak * 10:g}"))
    assert resumed.exit_code == 0, resumed.output
    expected, got = train_losses(uninterrupted), train_losses(out)
    assert sorted(got) == list(range(1, 7))
    assert max(abs(expected[s] - got[s]) for s in expected) <= 1e-5
    want = mx.load(str(uninterrupted / "adapters.safetensors"))
    have = mx.load(str(out / "adapters.safetensors"))
    for name, value in want.items():
        np.testing.assert_allclose(np.array(have[name]), np.array(value), atol=1e-6,
                                   err_msg=name)
    assert [r["event"] for r in read_metrics(out)].count("done") == 1


def test_two_ranks_stop_together(tiny_llama, data, uninterrupted, tmp_path):
    peak = max(r["peak_memory_gb"] for r in read_metrics(uninterrupted) if r["event"] == "train")
    out, logs = tmp_path / "run", tmp_path / "logs"
    results = finish(start(flags(tiny_llama, data, out, memory_limit=f"{peak / 4:g}"), logs),
                     logs)
    assert [r["status"] for r in results] == [2, 2], results
    messages = [line for r in results for line in r["output"].splitlines()
                if line.startswith("error: ")]
    assert len(messages) == 2 and messages[0] == messages[1]  # the worse rank's numbers
    assert "step 1 peaked at" in messages[0]
    assert [c.name for c in list_checkpoints(out)] == ["step-00000001"]
    assert results[1]["wrote"] == []


def test_the_default_limit_from_what_the_device_says():
    metal = {"max_recommended_working_set_size": 16 * 10**9, "memory_size": 24 * 10**9,
             "architecture": "applegpu_g15s"}
    assert default_limit(metal, 24 * 10**9) == (
        16 * 10**9, "the GPU's recommended working set of 24 GB of memory")
    assert default_limit({"total_memory": 80 * 10**9}, None)[0] == 60 * 10**9  # CUDA's key
    cpu = {"architecture": "x86_64", "device_name": "Intel(R) Xeon(R)"}  # no memory keys
    assert default_limit(cpu, 32 * 10**9) == (24 * 10**9, "0.75 of 32 GB of memory")
    assert default_limit({"memory_size": "unknown"}, 8 * 10**9)[0] == 6 * 10**9
    assert default_limit(cpu, None) is None


def test_resolving_the_flag():
    assert resolve_limit(0.0) == (0.0, None)  # off, silently
    assert resolve_limit(8.0) == (8.0, "memory limit: 8 GB (--memory-limit); a step that "
                                  "passes it stops the run with a checkpoint (--memory-limit "
                                  "GB sets another, 0 turns it off)")
    found = default_limit(mx.device_info(), machine_memory())
    assert found is not None and machine_memory() > 0  # Linux and macOS both say
    limit, line = resolve_limit(-1.0)
    assert limit == round(found[0] / GB, 2) and found[1] in line


@pytest.mark.parametrize("value", [-1.0, 0.0, 0.5, 64])
def test_the_flag_takes_gb_zero_or_minus_one(value):
    assert build_config({}, {"memory_limit": value}, "the command line").memory_limit == value


def test_a_negative_limit_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="'memory_limit' must be GB, 0 .off. or -1"):
        build_config({}, {"memory_limit": -2.0}, "the command line")
    result = CliRunner().invoke(cli, ["train", "--model", "m", "--data", str(tmp_path),
                                      "--memory-limit", "-0.5"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "'memory_limit' must be GB" in result.output


def test_the_advice_follows_the_run_settings():
    text = advice(TrainConfig(batch_size=4, max_seq_length=2048), held=GB, limit=8 * GB)
    assert text.startswith("add --grad-checkpoint and --resume, or start a new run with a "
                           "lower --batch-size (now 4; ")
    assert "--max-seq-length (now 2048)" in text
    on = advice(TrainConfig(grad_checkpoint=True, batch_size=1), held=GB, limit=8 * GB)
    assert "--grad-checkpoint" not in on and "--batch-size" not in on
    assert "--max-seq-length" in on and "higher --memory-limit" in on
    prompt = advice(TrainConfig(fine_tune_type="prompt"), held=GB, limit=8 * GB)
    assert "--grad-checkpoint" not in prompt  # prompt tuning cannot checkpoint its blocks
    weights = advice(TrainConfig(), held=9 * GB, limit=8 * GB)
    assert "alone hold 9 GB" in weights and "--quantize 4" in weights
    assert "--batch-size" not in weights
    assert "--quantize" not in advice(TrainConfig(quantize=4), held=9 * GB, limit=8 * GB)
    assert "--quantize" not in advice(TrainConfig(fine_tune_type="full"), held=9 * GB,
                                      limit=8 * GB)


def test_the_guard_sets_mlx_limits_and_puts_them_back():
    before = (mx.get_memory_limit(), cache_limit())
    config = TrainConfig()
    with MemoryGuard(0.5) as guard:
        assert mx.get_memory_limit() == 5 * 10**8
        assert cache_limit() <= min(before[1], 5 * 10**8 - mx.get_active_memory())
        x = mx.ones((1000, 1000))  # a step's 4 MB
        mx.eval(x)
        assert guard.check(1, config) is None
        assert cache_limit() <= 5 * 10**8 - 4 * 10**6  # the cache fits beside the step
        del x
    assert (mx.get_memory_limit(), cache_limit()) == before
    with MemoryGuard(0.001) as guard:  # 1 MB
        y = mx.ones((1000, 1000))
        mx.eval(y)
        message = guard.check(3, config)
        # The peak counts whatever else this process holds (other tests' arrays) besides y.
        assert message.startswith("step 3 peaked at ")
        assert ", over --memory-limit 0.001 GB: " in message
        assert "alone hold" in message  # y stays allocated: no batch setting helps
        assert cache_limit() == 0
    assert (mx.get_memory_limit(), cache_limit()) == before
    with MemoryGuard(0.0) as guard:  # off: MLX's limits untouched, never over
        assert (mx.get_memory_limit(), cache_limit()) == before
        assert guard.check(1, config) is None
    del y
