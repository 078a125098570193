#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite against real processes, in the
# project's own virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q --durations=20 "$@"
