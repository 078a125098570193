#!/usr/bin/env bash
# Install the dorafs systemd units: `sudo bash systemd/install.sh` (after `pip install .`).
#
#  - renders dorafs-registry.service, dorafs-worker@.service and dorafs-mount@.service into
#    /etc/systemd/system, with @DORAFS@, @DORAFS_WORKER@, @DORAFS_REGISTRY@ and
#    @FUSERMOUNT3@ replaced by absolute paths: systemd runs ExecStart= without a search
#    PATH worth the name, and pip puts console scripts wherever its Python lives (a venv,
#    /usr/local/bin, pyenv...). The scripts are found through the installed `dorafs`
#    distribution of $PYTHON (default: this checkout's .venv, which scripts/setup.sh makes,
#    else python3), or taken from --bindir DIR;
#  - installs /etc/sysusers.d/dorafs.conf and creates the `dorafs` user the workers run as;
#  - creates /etc/dorafs with example environment files, never overwriting one that exists;
#  - runs `systemctl daemon-reload` if systemd is running as PID 1.
#
# Safe to re-run (after an upgrade, or a move to another Python: the paths are re-rendered).
#
# Options:
#   --bindir DIR   take the console scripts from DIR instead of asking $PYTHON
#   --dest DIR     only render the units into DIR (nothing else is touched, no reload);
#                  used by the tests to run `systemd-analyze verify` on rendered units
#   --root DIR     install under DIR as if it were / (units, /etc/dorafs, sysusers.d; the
#                  user goes into DIR/etc/passwd via systemd-sysusers --root); no reload
#   --no-reload    do not run `systemctl daemon-reload`
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z $python ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
bindir="" dest="" root="" reload=1

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while (($#)); do
  case "$1" in
    --bindir) [[ $# -ge 2 ]] || die "--bindir needs a directory"; bindir="$2"; shift 2 ;;
    --dest) [[ $# -ge 2 ]] || die "--dest needs a directory"; dest="$2"; shift 2 ;;
    --root) [[ $# -ge 2 ]] || die "--root needs a directory"; root="${2%/}"; shift 2 ;;
    --no-reload) reload=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
units_only=0
if [[ -n $dest ]]; then units_only=1; reload=0; fi
if [[ -n $root ]]; then reload=0; fi
unit_dir="${dest:-$root/etc/systemd/system}"
conf_dir="$root/etc/dorafs"

# Ask the Python dorafs is installed into where pip put its scripts (the RECORD of the
# distribution), then its scripts directory; prints NAME=PATH (PATH empty if not found).
# -I and cd /: a source checkout in the current directory must not shadow the installed
# distribution.
locate_scripts() {
  cd / && "$python" -I - "$@" <<'PY'
import importlib.metadata as md, os, sys, sysconfig
found = {}
try:
    dist = md.distribution("dorafs")
    for f in dist.files or ():
        name, parent = os.path.basename(str(f)), os.path.basename(os.path.dirname(str(f)))
        if name in sys.argv[1:] and parent in ("bin", "Scripts"):
            found[name] = os.path.normpath(os.path.abspath(str(dist.locate_file(f))))
except md.PackageNotFoundError:
    pass
for name in sys.argv[1:]:
    candidate = os.path.join(sysconfig.get_path("scripts"), name)
    if name not in found and os.path.isfile(candidate):
        found[name] = candidate
    print(f"{name}={found.get(name, '')}")
PY
}

# --- find the console scripts -------------------------------------------------------
scripts=(dorafs dorafs-worker dorafs-registry)
declare -A path=()
if [[ -n $bindir ]]; then
  for name in "${scripts[@]}"; do path[$name]="$bindir/$name"; done
else
  while IFS='=' read -r name value; do
    if [[ -n $value ]]; then path[$name]="$value"; fi
  done < <(locate_scripts "${scripts[@]}" 2>/dev/null || true)
  # Last resort: the search path, but never a pyenv (or similar) shim: a shim needs the
  # caller's shell environment and would not run under systemd.
  for name in "${scripts[@]}"; do
    if [[ -z ${path[$name]:-} ]] && found="$(command -v "$name" 2>/dev/null)" && [[ $found != */shims/* ]]; then
      path[$name]="$found"
    fi
  done
fi
for name in "${scripts[@]}"; do
  p="${path[$name]:-}"
  [[ -n $p ]] || die "cannot find the '$name' console script: install dorafs first (pip install .), set PYTHON=/path/to/its/python, or pass --bindir DIR"
  [[ $p == /* ]] || p="$(cd "$(dirname "$p")" && pwd)/$(basename "$p")"
  [[ -f $p && -x $p ]] || die "$p is not an executable file"
  path[$name]="$p"
done
fusermount3="$(command -v fusermount3 2>/dev/null || true)"
[[ -n $fusermount3 ]] || die "fusermount3 not found: install FUSE 3 (apt-get install fuse3)"

# The services cannot run a program from a home directory: the worker and the registry
# see /home, /root and /run/user as empty (ProtectHome=) and run as other users.
for name in dorafs-worker dorafs-registry; do
  interpreter="$(head -n1 "${path[$name]}" | sed -n 's/^#![[:space:]]*\([^[:space:]]*\).*/\1/p')"
  for p in "${path[$name]}" "$interpreter"; do
    case "$p" in
      /root/*|/home/*|/run/user/*)
        echo "install.sh: warning: $name runs from $p, inside a home directory; dorafs-worker@ and" \
             "dorafs-registry cannot start from there (ProtectHome=, unprivileged users). Install" \
             "dorafs into a system location (e.g. a venv under /opt/dorafs) and re-run." >&2
        break 2 ;;
    esac
  done
done

# --- render the units ----------------------------------------------------------------
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }
render() {  # render SOURCE TARGET
  local tmp
  tmp="$(mktemp "$2.XXXXXX")"
  sed -e "s|@DORAFS_WORKER@|$(sed_escape "${path[dorafs-worker]}")|g" \
      -e "s|@DORAFS_REGISTRY@|$(sed_escape "${path[dorafs-registry]}")|g" \
      -e "s|@DORAFS@|$(sed_escape "${path[dorafs]}")|g" \
      -e "s|@FUSERMOUNT3@|$(sed_escape "$fusermount3")|g" "$1" >"$tmp"
  if grep -q '@[A-Z][A-Z0-9_]*@' "$tmp"; then
    rm -f "$tmp"; die "$1: a placeholder was left unrendered"
  fi
  chmod 0644 "$tmp"
  if [[ -f $2 ]] && cmp -s "$tmp" "$2"; then
    rm -f "$tmp"; say "unchanged $2"
  else
    mv -f "$tmp" "$2"; say "installed $2"
  fi
}
mkdir -p "$unit_dir"
for unit in dorafs-registry.service dorafs-worker@.service dorafs-mount@.service; do
  render "$here/$unit" "$unit_dir/$unit"
done
say "ExecStart paths: ${path[dorafs-registry]}, ${path[dorafs-worker]}, ${path[dorafs]}"
((units_only)) && exit 0

# --- the workers' user ---------------------------------------------------------------
mkdir -p "$root/etc/sysusers.d"
install -m 0644 "$here/dorafs.sysusers" "$root/etc/sysusers.d/dorafs.conf"
if [[ -n $root ]]; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers --root="$root" dorafs.conf  # a bare name: looked up under --root
  else
    say "systemd-sysusers not found: create the 'dorafs' user in $root yourself"
  fi
elif getent passwd dorafs >/dev/null; then
  say "user dorafs exists"
elif command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers /etc/sysusers.d/dorafs.conf && say "created user dorafs"
else
  useradd --system --user-group --home-dir /var/cache/dorafs --no-create-home \
          --shell /usr/sbin/nologin --comment "dorafs cache worker" dorafs && say "created user dorafs"
fi

# --- /etc/dorafs -----------------------------------------------------------------------
# 0755: the daemons (unprivileged) read dorafs.toml here. The environment files are read
# by systemd itself, as root, so they can be 0600 and hold credentials.
mkdir -p "$conf_dir"
chmod 0755 "$conf_dir"
for example in registry.env worker.env worker-INSTANCE.env.example mount-INSTANCE.env.example; do
  target="$conf_dir/$example"
  if [[ -e $target ]]; then
    say "kept $target (exists)"
  else
    install -m 0600 "$here/env/$example" "$target"
    say "created $target"
  fi
done

# --- reload ------------------------------------------------------------------------------
if ((reload)); then
  # sd_booted(3): systemd is PID 1 if and only if /run/systemd/system exists.
  if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload && say "systemctl daemon-reload: done"
  else
    say "systemd is not running as PID 1 (no /run/systemd/system): skipped systemctl daemon-reload;" \
        "run it once this machine boots with systemd"
  fi
fi
cat <<'EOF'

Next (see systemd/README.md):
  systemctl enable --now dorafs-registry.service
  systemctl enable --now dorafs-worker@ssd1.service     # cache in /var/cache/dorafs/ssd1
  cp /etc/dorafs/mount-INSTANCE.env.example /etc/dorafs/mount-$(systemd-escape --path /mnt/data).env
  systemctl enable --now dorafs-mount@$(systemd-escape --path /mnt/data).service
EOF
