#!/usr/bin/env bash
# Set up a virtual environment with glmkit, then chat: arguments go to `glmkit chat`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/glmkit ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # The pinned CPU torch first: an unpinned one would pull gigabytes of CUDA packages.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e .
  # glmkit's AVX-512 CPU kernels are compiled on first use; do it here, with the set-up, not at the first reply
  # (a CPU or system that cannot build them is told so once, and glmkit uses torch's kernels).
  .venv/bin/python -c "from glmkit import cpu_kernels; cpu_kernels.available()"
fi
exec .venv/bin/glmkit chat "$@"
