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
fi
exec .venv/bin/glmkit chat "$@"
