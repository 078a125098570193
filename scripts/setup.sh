#!/usr/bin/env bash
# Install what dorafs needs on a Debian machine, as root: the system packages (FUSE 3 for
# fusermount3: dorafs speaks the kernel protocol itself, without libfuse) and dorafs
# itself, with its test extras, into the project's
# own virtual environment `.venv` at the repository root. Nothing goes into the system's
# Python, so a package that happens to be installed there cannot hide a missing
# dependency or a wrong version bound. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
packages=(fuse3 gcc systemd fio)  # gcc: the protocol test compiles the kernel's fuse.h; systemd: systemd-analyze for the unit tests; fio: write tests
packages+=(etcd-server)  # the etcd membership backend's tests run a real 3-member cluster
# Debian splits venv and ensurepip out of its python3; a Python built elsewhere has them.
"$python" -c "import venv, ensurepip" 2>/dev/null || packages+=(python3-venv)
"$python" - <<'PY' 2>/dev/null || packages+=(python3-dev)
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

[[ -x .venv/bin/python ]] || { echo "setup: creating the virtual environment .venv" >&2; "$python" -m venv .venv; }
venv=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -v -e "Running pip as the 'root' user" -e "is ignored: it is neither" || true; }
"$venv" -m pip install -q -e ".[test]" 2>&1 | quiet
"$venv" -c "import dorafs, worker, registry" || { echo "setup: dorafs did not install" >&2; exit 1; }
# PyTorch for the checkpoint round-trip test: exactly this pin, a local CPU-only wheel
# (any other spec would download gigabytes of CUDA libraries).
"$venv" -c "import torch" 2>/dev/null || "$venv" -m pip install -q torch==2.13.0 2>&1 | quiet

# Unprivileged mounts go through fusermount3, which opens /dev/fuse as the user: udev's
# rule makes it 0666 on a booted Debian; a container without udev leaves it 0600.
[[ -c /dev/fuse ]] && chmod 0666 /dev/fuse

# mount(8) runs /sbin/mount.<type> for `mount -t dorafs` and fstab lines: link the helper
# there (the real script, whose first line names the environment's Python, not a shim).
ln -sf "$PWD/.venv/bin/mount.dorafs" /sbin/mount.dorafs
