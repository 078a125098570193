#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite against real processes, in the
# project's own virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Two processes, each taking whole test files (their module fixtures are set up once):
# most tests wait on daemons, the S3 server and the kernel rather than on a core, and
# one after another the suite took 24-28 minutes on a 2-core machine.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=20 "$@"
