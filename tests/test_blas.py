"""Fast BLAS on Linux CPUs: measured as MLX sees it, preloaded by the command itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_lora.model.blas import PRELOAD_OFF, openblas_core, system_fast_blas

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
# numpy first: its bundled OpenBLAS must not hide that MLX computes on the reference BLAS.
PROBE = ("import numpy; numpy.ones((64, 64)) @ numpy.ones((64, 64)); "
         "from mlx_lora.model.blas import slow_blas_warning; print(slow_blas_warning())")
COMMAND = "from mlx_lora.cli import main; main()"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux CPU matter")


def run(code: str, *args, preload: str | None = None, **extra_env) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", PRELOAD_OFF)}
    env.update(extra_env)
    if preload:
        env["LD_PRELOAD"] = preload
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


@linux_only
def test_reference_blas_is_reported_with_the_fix():
    message = run(PROBE)
    assert message.startswith("warning: MLX is using a slow BLAS"), message
    fix = f"LD_PRELOAD={system_fast_blas()}" if system_fast_blas() else "libopenblas0-pthread"
    assert fix in message


@pytest.mark.skipif(not OPENBLAS.exists(), reason="OpenBLAS is not installed here")
def test_openblas_preloaded_is_silent():
    assert run(PROBE, preload=str(OPENBLAS)) == "None"


@pytest.mark.skipif(not OPENBLAS.exists(), reason="OpenBLAS is not installed here")
def test_the_command_preloads_a_fast_blas_by_itself():
    assert run(COMMAND, "env").endswith("BLAS: fast")
    turned_off = run(COMMAND, "env", **{PRELOAD_OFF: "1"})
    assert "warning: MLX is using a slow BLAS" in turned_off


def test_an_avx512_cpu_gets_openblas_skylakex_kernels_unless_the_user_chose():
    assert openblas_core({"sse2", "avx2", "avx512f"}, {}) == {"OPENBLAS_CORETYPE": "SkylakeX"}
    assert openblas_core({"sse2", "avx2"}, {}) == {}  # OpenBLAS's own detection stands
    assert openblas_core({"avx512f"}, {"OPENBLAS_CORETYPE": "Haswell"}) == {}
