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
# The chat page's test drives Debian's Chromium (never a downloaded browser): install it when absent,
# if we may (as root, as in CI).
if [ "$(id -u)" = 0 ] && [ ! -e /usr/bin/chromium ]; then
    apt-get update -q && apt-get install -y -q chromium
fi
python -m pytest -q "$@"
