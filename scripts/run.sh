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
fi
exec "$@"
