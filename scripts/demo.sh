#!/usr/bin/env bash
# Set up, then mount a dataset through the embedded single-node cluster and read it cold
# and warm. With no argument the dataset lives in a local S3-compatible server started
# for the demo; give an s3://... or file://... URI to use your own data instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python scripts/demo.py "$@"
