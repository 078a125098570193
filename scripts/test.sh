#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite against real processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -q "$@"
