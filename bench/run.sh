#!/usr/bin/env bash
# The benchmark in one command, as root on a Debian machine:
#   bash bench/run.sh            quick mode (a few minutes)
#   bash bench/run.sh --full     full mode (1 GiB object, 10,000 files)
# Other options go to the harness: .venv/bin/python bench/harness.py --help
# (every bench/*.py runs with the project's environment: `. .venv/bin/activate` first)
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python bench/harness.py "$@"
