#!/usr/bin/env bash
# Install what the benchmark needs on a Debian machine, as root; safe to re-run.
#   - dorafs itself: scripts/setup.sh (fuse3, pip install -e '.[test]')
#   - pyfuse3 (and libfuse3-dev, pkg-config to build it) into .venv, for the ceiling
#     only: bench/ceiling.py is a minimal pyfuse3 server dorafs is measured against
#   - Debian: s3fs (s3fs-fuse), rclone, fio; nodejs + npm only if there is no npm yet
#   - npm: s3rver 3.7.1 under bench/.cache/node (not committed)
#   - pip, into the project's .venv: matplotlib, and torch==2.13.0 (this exact pin resolves to a local CPU wheel;
#     any other torch spec would download gigabytes of CUDA libraries)
#   - pip, into the project's .venv: awscrt and obstore, the S3 clients bench/s3clients.py
#     measures against boto3 (the versions its figures in bench/README.md were taken with)
#   - pip, into the project's .venv: py-spy 0.4.3, for `bench/parquet.py --profile DIR`
#   - Debian: openmpi-bin, libopenmpi-dev; pip, into .venv: mpi4py and dlio-benchmark 2.0.0
#     for bench/dlio.py. DLIO's package requires GPU builds (nvidia-dali-cuda110, the full
#     tensorflow, torchvision/torchaudio, which would pull CUDA torch) that its PyTorch/npz
#     path never imports: it is installed without dependencies, with the ones that path
#     uses (hydra-core, omegaconf, h5py, psutil, Pillow, pydftracer; TensorFlow's CPU build
#     and torch are already there). `pip check` then lists the GPU requirements as missing.
# Whatever cannot be installed is reported; the harness then skips what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "bench setup: scripts/setup.sh failed" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
unavailable=()
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

want=()
for pkg in s3fs rclone fio; do installed "$pkg" || want+=("$pkg"); done
command -v npm >/dev/null 2>&1 || want+=(nodejs npm)
if ((${#want[@]})); then
  apt-get update -qq || true
  ok=()
  for pkg in "${want[@]}"; do
    cand=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [[ -z "$cand" || "$cand" == "(none)" ]]; then unavailable+=("apt:$pkg"); else ok+=("$pkg"); fi
  done
  if ((${#ok[@]})); then
    echo "bench setup: apt-get install ${ok[*]}" >&2
    apt-get install -y -qq "${ok[@]}" >/dev/null || unavailable+=("apt:${ok[*]} (install failed)")
  fi
fi

for pkg in libfuse3-dev pkg-config; do
  installed "$pkg" || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null || unavailable+=("apt:$pkg")
done
.venv/bin/python -c "import pyfuse3" 2>/dev/null || .venv/bin/python -m pip install -q "pyfuse3>=3.3" 2>&1 \
  | grep -v -e "Running pip as the 'root'" -e "is ignored: it is neither" || true
.venv/bin/python -c "import pyfuse3" 2>/dev/null || unavailable+=("pip:pyfuse3 (the ceiling)")

S3RVER=bench/.cache/node/node_modules/.bin/s3rver
if [[ ! -x "$S3RVER" ]]; then
  if command -v npm >/dev/null 2>&1; then
    echo "bench setup: npm install s3rver@3.7.1 (under bench/.cache/node)" >&2
    mkdir -p bench/.cache/node
    npm install --prefix bench/.cache/node --no-audit --no-fund --loglevel=error s3rver@3.7.1 >/dev/null 2>&1 \
      || unavailable+=("npm:s3rver")
  else
    unavailable+=("npm:s3rver (no npm)")
  fi
fi

venv=.venv/bin/python  # the project's own environment, made by scripts/setup.sh
$venv -c "import matplotlib" 2>/dev/null || $venv -m pip install -q matplotlib 2>&1 | grep -v -e "Running pip as the 'root'" -e "is ignored: it is neither" || true
$venv -c "import matplotlib" 2>/dev/null || unavailable+=("pip:matplotlib")
$venv -c "import torch" 2>/dev/null || $venv -m pip install -q "torch==2.13.0" 2>&1 | grep -v -e "Running pip as the 'root'" -e "is ignored: it is neither" || true
$venv -c "import torch" 2>/dev/null || unavailable+=("pip:torch==2.13.0")

S3CLIENTS=(awscrt==0.38.1 obstore==0.12.1)
if ! $venv -c "import awscrt.s3, obstore" 2>/dev/null; then
  echo "bench setup: .venv/bin/python -m pip install ${S3CLIENTS[*]}" >&2
  $venv -m pip install -q "${S3CLIENTS[@]}" 2>&1 | grep -v -e "Running pip as the 'root'" -e "is ignored: it is neither" || true
fi
$venv -c "import awscrt.s3, obstore" 2>/dev/null || unavailable+=("pip:${S3CLIENTS[*]} (.venv)")
[ -x .venv/bin/py-spy ] || $venv -m pip install -q "py-spy==0.4.3" 2>&1 | grep -v -e "Running pip as the 'root'" -e "is ignored: it is neither" || true
[ -x .venv/bin/py-spy ] || unavailable+=("pip:py-spy==0.4.3 (.venv, bench/parquet.py --profile)")

for pkg in openmpi-bin libopenmpi-dev; do
  installed "$pkg" || apt-get install -y -qq "$pkg" >/dev/null || unavailable+=("apt:$pkg")
done
DLIO=(dlio-benchmark==2.0.0)
DLIO_DEPS=("mpi4py>=3.1.4,<5" "hydra-core>=1.3.2,<2" "omegaconf>=2.2,<3" "h5py>=3.11" "psutil>=5.9" "Pillow>=9.3" "pydftracer==1.0.2")
if ! $venv -c "import dlio_benchmark, mpi4py, hydra, dftracer" 2>/dev/null; then
  echo "bench setup: .venv/bin/python -m pip install --no-deps ${DLIO[*]}; ${DLIO_DEPS[*]}" >&2
  $venv -m pip install -q --no-deps "${DLIO[@]}" 2>&1 | grep -v -e "Running pip as the 'root'" -e "is ignored: it is neither" || true
  $venv -m pip install -q "${DLIO_DEPS[@]}" 2>&1 | grep -v -e "Running pip as the 'root'" -e "is ignored: it is neither" \
    -e "dependency resolver" -e "dlio-benchmark 2.0.0 requires" || true
fi
$venv -c "import dlio_benchmark, mpi4py, hydra, dftracer" 2>/dev/null || unavailable+=("pip:dlio-benchmark (bench/dlio.py)")

if ((${#unavailable[@]})); then
  echo "bench setup: NOT available: ${unavailable[*]} (the harness skips what needs them)" >&2
fi
exit 0
