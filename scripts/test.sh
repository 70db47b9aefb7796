#!/usr/bin/env bash
# Set up a virtual environment with glmkit and its test dependencies, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The pinned CPU torch first: an unpinned one would pull gigabytes of CUDA packages.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pytest -q "$@"
