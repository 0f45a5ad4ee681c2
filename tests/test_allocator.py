"""Freed CPU memory is reused on glibc: a new large array faults no fresh pages in."""

import platform
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_lora.model import allocator

glibc_cpu = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator only")
# Page faults while MLX writes a new 64 MB array, the second time (the first may grow the heap).
FAULTS = """
import resource, sys
import mlx.core as mx
from mlx_lora.model.allocator import reuse_freed_memory
reused = sys.argv[1] == "reuse" and reuse_freed_memory()
x = mx.ones((16, 2**20))
mx.eval(x)
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mx.eval(x * 2.0)  # allocated, written, freed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(reused, faults)
"""
PAGES = 16 * 2**20 * 4 // 4096


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@glibc_cpu
def test_a_freed_large_array_is_reused_without_page_faults():
    assert faults("plain") == ("False", pytest.approx(PAGES, rel=0.2))  # glibc's default
    reused, count = faults("reuse")
    assert reused == "True"
    assert count < PAGES // 20


def test_left_alone_off_the_cpu(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert allocator.reuse_freed_memory.__wrapped__() is False
