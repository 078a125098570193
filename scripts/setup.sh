#!/usr/bin/env bash
# Install what dorafs needs on a Debian machine, as root: the system packages (FUSE 3 and
# what pyfuse3 builds against) and dorafs itself with its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 libfuse3-dev pkg-config gcc systemd fio)  # systemd: systemd-analyze for the unit tests; fio: write tests
packages+=(etcd-server)  # the etcd membership backend's tests run a real 3-member cluster
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
python3 - <<'PY' 2>/dev/null || packages+=(python3-dev)
import os, sysconfig, sys
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  # Tests start their own etcd members on free ports: the packaged service is not needed.
  if [[ " ${missing[*]} " == *" etcd-server "* ]]; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
  fi
fi

# Debian's own python3 refuses system-wide pip installs (PEP 668); this machine is ours.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e ".[test]" 2>&1 | grep -v -e "Running pip as the 'root' user" -e "is ignored: it is neither" || true
python3 -c "import dorafs, worker, registry, pyfuse3" || { echo "setup: dorafs did not install" >&2; exit 1; }
# PyTorch for the checkpoint round-trip test: exactly this pin, a local CPU-only wheel
# (any other spec would download gigabytes of CUDA libraries).
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0 2>&1 | grep -v "Running pip as the 'root' user" || true

# mount(8) runs /sbin/mount.<type> for `mount -t dorafs` and fstab lines: link the helper
# there (the real script, whose first line names this Python, not a shell shim).
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
ln -sf "$scripts/mount.dorafs" /sbin/mount.dorafs
