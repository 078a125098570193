#!/usr/bin/env bash
# The benchmark in one command, as root on a Debian machine:
#   bash bench/run.sh            quick mode (a few minutes)
#   bash bench/run.sh --full     full mode (1 GiB object, 10,000 files)
# Other options go to the harness: python3 bench/harness.py --help
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup.sh
exec python3 bench/harness.py "$@"
