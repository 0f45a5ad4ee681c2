"""Fast float32 matmuls on Linux CPUs: use a system OpenBLAS when there is one, else say how.

MLX's Linux CPU wheel links the slow reference BLAS. Which BLAS MLX really computes with is
measured (a numpy that bundles OpenBLAS loads it too, under other symbol names, and says
nothing about MLX); the `mlx-lora` command re-executes itself once with a system OpenBLAS
preloaded, which replaces the reference BLAS for MLX, unless MLX_LORA_NO_BLAS_PRELOAD is set.
"""

import os
import sys
import time
from pathlib import Path

PRELOAD_OFF = "MLX_LORA_NO_BLAS_PRELOAD"  # set (to anything) to keep the process as started
FAST_BLAS_LIBRARIES = (  # Debian/Ubuntu's OpenBLAS alternatives, then plain OpenBLAS builds
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
SLOW_GFLOPS = 10.0  # the reference BLAS does ~2 here; OpenBLAS ~100 on two cores
INSTALL = "apt-get install libopenblas0-pthread (or your system's OpenBLAS package)"


def system_fast_blas() -> str | None:
    """The first fast BLAS library installed on this system, if any."""
    return next((lib for lib in FAST_BLAS_LIBRARIES if Path(lib).exists()), None)


def preload_fast_blas(argv: list[str]) -> None:
    """Re-execute this command with a system OpenBLAS preloaded, once, on Linux."""
    if not sys.platform.startswith("linux") or os.environ.get(PRELOAD_OFF):
        return
    library = system_fast_blas()
    preloaded = os.environ.get("LD_PRELOAD", "")
    if library is None or "blas" in preloaded.lower():  # none here, or one chosen already
        return
    env = {**os.environ, PRELOAD_OFF: "1",
           "LD_PRELOAD": library + (f":{preloaded}" if preloaded else "")}
    env.update(openblas_core(_cpu_flags(), os.environ))
    os.execve(sys.executable, [sys.executable, "-m", "mlx_lora", *argv], env)


def openblas_core(cpu_flags: set[str], environ) -> dict[str, str]:
    """OPENBLAS_CORETYPE=SkylakeX on an AVX-512 CPU, unless the user set one.

    OpenBLAS builds older than the CPU (Debian 12's 0.3.21 on Sapphire Rapids) take it for a
    Prescott and run SSE3 kernels: a 2048^2 float32 matmul at 23 GFLOP/s instead of 250
    (measured). Every AVX-512 CPU runs the SkylakeX kernels.
    """
    if environ.get("OPENBLAS_CORETYPE") or "avx512f" not in cpu_flags:
        return {}
    return {"OPENBLAS_CORETYPE": "SkylakeX"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}


def matmul_gflops() -> float:
    """What MLX's float32 matmul does on this device, measured on 256 x 256 matrices."""
    import mlx.core as mx

    a = mx.random.normal((256, 256), key=mx.random.key(0))
    mx.eval(a @ a)
    best = float("inf")
    for _ in range(10):  # the best of several: one matmul is ~0.3 ms, easily hit by a hiccup
        started = time.perf_counter()
        mx.eval(a @ a)
        best = min(best, time.perf_counter() - started)
    return 2 * 256**3 / max(best, 1e-9) / 1e9


def slow_blas_warning() -> str | None:
    """A one-line warning when MLX computes on a Linux CPU with a slow BLAS, else None."""
    import mlx.core as mx

    if not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        return None
    gflops = matmul_gflops()
    if gflops >= SLOW_GFLOPS:
        return None
    library = system_fast_blas()
    fix = (f"run through the mlx-lora command (it preloads {library} itself) or with "
           f"LD_PRELOAD={library}" if library else
           f"{INSTALL}; the mlx-lora command then uses it by itself")
    return (f"warning: MLX is using a slow BLAS on this CPU ({gflops:.1f} GFLOP/s for float32 "
            f"matmuls); to make it about 40x faster: {fix}")
