#!/usr/bin/env bash
# Run a command inside .venv; on Linux, with Debian's OpenBLAS preloaded when it is installed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$root/.venv/bin:$PATH"
if [ "$(uname -s)" = Linux ]; then
  for lib in /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
             /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3; do
    if [ -e "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; break; fi
  done
  # Debian 12's OpenBLAS (0.3.21) takes CPUs newer than it (Sapphire Rapids) for a Prescott and
  # runs SSE3 kernels: a 2048^2 float32 matmul at 23 GFLOP/s instead of 160 (measured). Every
  # AVX-512 CPU runs its SkylakeX kernels; OPENBLAS_CORETYPE set by the caller wins.
  if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    export OPENBLAS_CORETYPE=SkylakeX
  fi
fi
exec "$@"
