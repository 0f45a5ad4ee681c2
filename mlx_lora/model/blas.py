"""Tell Linux CPU users when MLX runs on the slow reference BLAS, and how to fix it."""

import sys

import mlx.core as mx

FAST_BLAS_NAMES = ("openblas", "mkl", "blis", "armpl", "accelerate")
FIX = ("apt-get install libopenblas0-pthread, then run with "
       "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 (about 40x faster "
       "float32 matmuls)")


def loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux only)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return sorted({line.split()[-1] for line in maps if ".so" in line})


def slow_blas_warning() -> str | None:
    """A one-line warning when MLX computes on a Linux CPU with the reference BLAS, else None."""
    if not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        return None
    libraries = [path.lower() for path in loaded_libraries()]
    if any(name in path for path in libraries for name in FAST_BLAS_NAMES):
        return None
    if not any("libblas" in path for path in libraries):
        return None
    return f"warning: MLX is using the slow reference BLAS on this CPU; to fix: {FIX}"
