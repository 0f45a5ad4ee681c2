"""The slow-BLAS warning on Linux CPU: said without OpenBLAS, silent with it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
PROBE = "from mlx_lora.model.blas import slow_blas_warning; print(slow_blas_warning())"


def probe(preload: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux CPU matter")
def test_reference_blas_is_reported_with_the_fix():
    message = probe(None)
    assert message.startswith("warning: MLX is using the slow reference BLAS")
    assert "libopenblas0-pthread" in message and "LD_PRELOAD" in message


@pytest.mark.skipif(not OPENBLAS.exists(), reason="OpenBLAS is not installed here")
def test_openblas_preloaded_is_silent():
    assert probe(str(OPENBLAS)) == "None"
