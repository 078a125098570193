"""The systemd units (systemd/) as install.sh renders them.

`systemd-analyze verify` passes on every unit and on template instances; the units load in
systemd's own unit loader (`systemd --test`, run unprivileged, no systemd as PID 1 needed)
with the instance specifiers, ExecStart lines and sandboxing resolved as documented;
install.sh renders absolute paths to the installed console scripts, is idempotent and never
overwrites an environment file.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "systemd"
INSTALL = SYSTEMD / "install.sh"
UNITS = ["dorafs-registry.service", "dorafs-worker@.service", "dorafs-mount@.service"]
ENV_FILES = ["registry.env", "worker.env", "worker-INSTANCE.env.example", "mount-INSTANCE.env.example"]
# A mount point that needs real escaping: systemd-escape --path gives srv-data\x20sets-a\x2db.
ODD_MOUNTPOINT = "/srv/data sets/a-b"
SETUP_HINT = "scripts/setup.sh should install the Debian package `systemd`"

# --- helpers -------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: {SETUP_HINT}")
    return path


def _systemd_binary() -> str:
    for candidate in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"the systemd binary (/lib/systemd/systemd) is missing: {SETUP_HINT}")


def _run_install(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=120,
                            env=env, cwd=REPO)
    assert result.returncode == 0, f"install.sh {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result


def _escape_path(path: str) -> str:
    return subprocess.run([_tool("systemd-escape"), "--path", path], capture_output=True, text=True,
                          check=True).stdout.strip()


def verify(*units: Path) -> str:
    """`systemd-analyze verify` offline; returns its complaints ("" when clean).

    verify exits 0 on an unknown key or a bad value (it prints "..., ignoring"), so any
    output at all counts as a complaint.
    """
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    result = subprocess.run(
        [_tool("systemd-analyze"), "verify", "--man=no", "--generators=no", *map(str, units)],
        capture_output=True, text=True, timeout=60, env=env, cwd=units[0].parent,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not output:
        output = f"exit status {result.returncode}"
    return output


def load_units(unit_dir: Path, *names: str) -> dict[str, dict[str, list[str]]]:
    """Load units with systemd's own loader and return each one's dump, key -> values.

    `systemd --test --system` builds the initial transaction for `--unit` from the unit path
    and prints every loaded unit, specifiers resolved, then exits. It refuses to run as
    root, so it runs as nobody, which needs the unit directory to be world-readable.
    """
    systemd = _systemd_binary()
    command = [systemd, "--test", "--system", "--no-pager"]
    if os.geteuid() == 0:
        command = [_tool("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SYSTEMD_UNIT_PATH": f"{unit_dir}:",
           "SYSTEMD_LOG_LEVEL": "warning", "SYSTEMD_COLORS": "0"}
    dumps = {}
    for name in names:
        result = subprocess.run([*command, f"--unit={name}"], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, f"systemd --test --unit={name} failed:\n{result.stderr}"
        dumps[name] = _parse_dump(result.stdout, name)
    return dumps


def _parse_dump(text: str, name: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    header = f"\t-> Unit {name}:"
    assert header in lines, f"{name} not in the systemd --test dump"
    found: dict[str, list[str]] = defaultdict(list)
    section = None
    for line in lines[lines.index(header) + 1:]:
        if line.startswith("\t-> Unit "):
            break
        if line.startswith("\t\t-> "):  # "-> ExecStart:", "-> Job 1:"
            section = line.strip()[3:].rstrip(":")
            continue
        key, _, value = line.strip().partition(": ")
        if line.startswith("\t\t\t") and section and key == "Command Line":
            found[section].append(value)
        elif line.startswith("\t\t") and not line.startswith("\t\t\t"):
            section = None
            found[key.rstrip(":")].append(value)
    return dict(found)


def _exec_lines(unit_text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^(Exec\w+)=(.*)$", unit_text, re.M)]


def _program(command_line: str) -> str:
    return shlex.split(command_line)[0].lstrip("-@:+!")


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (stat.S_IMODE(p.stat().st_mode), p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered():
    """The units as `install.sh --dest DIR --no-reload` renders them (DIR world-readable)."""
    unit_dir = Path(tempfile.mkdtemp(prefix="dorafs-units-"))
    try:
        unit_dir.chmod(0o755)
        result = _run_install("--dest", str(unit_dir), "--no-reload")
        yield unit_dir, result
    finally:
        shutil.rmtree(unit_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def scripts():
    """Where pip put the console scripts of the dorafs that the tests' Python runs.

    Asked in a subprocess with -I from /: in the source tree, a stale dorafs.egg-info would
    shadow the installed distribution's record of its files.
    """
    code = ("import importlib.metadata as md, os\n"
            "d = md.distribution('dorafs')\n"
            "for f in d.files or ():\n"
            "    if os.path.basename(os.path.dirname(str(f))) == 'bin':\n"
            "        print(os.path.basename(str(f)), os.path.normpath(str(d.locate_file(f))))\n")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd="/")
    found = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    missing = {"dorafs", "dorafs-worker", "dorafs-registry"} - set(found)
    assert not missing, f"console scripts not installed: {missing} (pip install -e .)"
    return found


# --- systemd-analyze verify -------------------------------------------------------------------


@pytest.mark.parametrize("unit", [*UNITS, "dorafs-worker@ssd1.service", "dorafs-mount@mnt-data.service",
                                  "dorafs-mount@srv-data\\x20sets-a\\x2db.service"])
def test_systemd_analyze_verify_passes(rendered, unit):
    unit_dir, _ = rendered
    assert verify(unit_dir / unit) == ""


def test_verify_catches_mistakes(rendered, tmp_path):
    """The check is not vacuous: a bad key, a bad value, a missing program are reported."""
    unit_dir, _ = rendered
    text = (unit_dir / "dorafs-registry.service").read_text()
    broken = {
        "bad-key.service": text.replace("LockPersonality=yes", "LockPersonality=yes\nProtectEverything=yes"),
        "bad-value.service": text.replace("Type=notify", "Type=notifyy"),
        "no-program.service": re.sub(r"^ExecStart=\S+", "ExecStart=/nonexistent/dorafs-registry", text, flags=re.M),
    }
    for name, content in broken.items():
        (tmp_path / name).write_text(content)
        assert verify(tmp_path / name), f"{name}: systemd-analyze verify saw nothing wrong"


# --- install.sh: rendering ---------------------------------------------------------------------


def test_install_renders_absolute_existing_exec_paths(rendered, scripts):
    unit_dir, result = rendered
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(UNITS)
    expected = {"dorafs-registry.service": {"ExecStart": scripts["dorafs-registry"]},
                "dorafs-worker@.service": {"ExecStart": scripts["dorafs-worker"]},
                "dorafs-mount@.service": {"ExecStart": scripts["dorafs"], "ExecStopPost": shutil.which("fusermount3")}}
    for unit in UNITS:
        text = (unit_dir / unit).read_text()
        assert not re.search(r"@[A-Z0-9_]+@", text), f"{unit}: a placeholder is left"
        execs = _exec_lines(text)
        assert {kind for kind, _ in execs} == set(expected[unit]), unit
        for kind, command_line in execs:
            program = _program(command_line)
            assert os.path.isabs(program), f"{unit}: {kind}={command_line}"
            assert os.path.isfile(program) and os.access(program, os.X_OK), f"{unit}: {program} is not executable"
            assert "/shims/" not in program, f"{unit}: {program} is a shim, which needs a login shell"
            assert os.path.samefile(program, expected[unit][kind]), f"{unit}: {program} != {expected[unit][kind]}"
    # The rendered paths are the real programs, not look-alikes.
    for name in ("dorafs-registry", "dorafs-worker"):
        out = subprocess.run([scripts[name], "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and name in out.stdout, out.stderr
    out = subprocess.run([scripts["dorafs"], "mount", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--foreground" in out.stdout, out.stderr


def test_install_bindir_and_missing_scripts(tmp_path, scripts):
    bindir = Path(scripts["dorafs-worker"]).parent
    out_dir = tmp_path / "units"
    _run_install("--dest", str(out_dir), "--bindir", str(bindir))
    assert f"ExecStart={bindir}/dorafs-worker " in (out_dir / "dorafs-worker@.service").read_text()
    # A directory without the scripts is a clear error, not a unit that fails at boot.
    result = subprocess.run(["bash", str(INSTALL), "--dest", str(tmp_path / "x"), "--bindir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "is not an executable file" in result.stderr
    assert not (tmp_path / "x").exists()


# --- the units as systemd loads them ---------------------------------------------------------


def test_template_instance_specifiers_resolve(rendered, scripts):
    unit_dir, _ = rendered
    odd = _escape_path(ODD_MOUNTPOINT)
    assert odd == "srv-data\\x20sets-a\\x2db"
    assert _escape_path("/mnt/data") == "mnt-data"
    names = ["dorafs-registry.service", "dorafs-worker@ssd1.service", "dorafs-mount@mnt-data.service",
             f"dorafs-mount@{odd}.service"]
    units = load_units(unit_dir, *names)
    fusermount3 = shutil.which("fusermount3")

    registry = units["dorafs-registry.service"]
    assert registry["ExecStart"] == [f"{scripts['dorafs-registry']} --state-dir /var/lib/dorafs/registry"]
    assert registry["StateDirectory"] == ["dorafs/registry"]
    assert registry["EnvironmentFile"] == ["-/etc/dorafs/registry.env"]
    assert registry["DynamicUser"] == ["yes"]

    worker = units["dorafs-worker@ssd1.service"]
    assert worker["Description"] == ["dorafs cache worker on /var/cache/dorafs/ssd1"]
    assert worker["ExecStart"] == [f"{scripts['dorafs-worker']} --cache-dir /var/cache/dorafs/ssd1"]
    assert worker["CacheDirectory"] == ["dorafs/ssd1"]
    assert worker["EnvironmentFile"] == ["-/etc/dorafs/worker.env", "-/etc/dorafs/worker-ssd1.env"]
    assert "/var/cache/dorafs/ssd1 (origin-file)" in worker["RequiresMountsFor"]
    assert worker["User"] == ["dorafs"] and worker["DynamicUser"] == ["no"]

    mount = units["dorafs-mount@mnt-data.service"]
    assert mount["Description"] == ["dorafs mount on /mnt/data"]
    assert mount["ExecStart"] == [
        f'{scripts["dorafs"]} mount "\\${{UFS_URI}}" /mnt/data --foreground -o "\\${{MOUNT_OPTIONS}}"']
    assert mount["ExecStopPost"] == [f"{fusermount3} -u -z /mnt/data"]
    assert mount["EnvironmentFile"] == ["/etc/dorafs/mount-mnt-data.env"]
    assert "XDG_CACHE_HOME=/var/cache/dorafs/mount-mnt-data" in mount["Environment"]
    assert mount["CacheDirectory"] == ["dorafs/mount-mnt-data"]

    # The escaped instance comes back as one argument: the original path, space and dash.
    odd_mount = units[f"dorafs-mount@{odd}.service"]
    assert odd_mount["Description"] == [f"dorafs mount on {ODD_MOUNTPOINT}"]
    (start,) = odd_mount["ExecStart"]
    assert shlex.split(start)[1:5] == ["mount", "\\${UFS_URI}", ODD_MOUNTPOINT, "--foreground"]
    assert shlex.split(odd_mount["ExecStopPost"][0]) == [fusermount3, "-u", "-z", ODD_MOUNTPOINT]
    assert odd_mount["EnvironmentFile"] == [f"/etc/dorafs/mount-{odd}.env"]


def test_units_readiness_restart_ordering(rendered):
    unit_dir, _ = rendered
    units = load_units(unit_dir, "dorafs-registry.service", "dorafs-worker@ssd1.service",
                       "dorafs-mount@mnt-data.service")
    for name, unit in units.items():
        assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"], name
        assert unit["Restart"] == ["on-failure"], name
        assert unit["RestartSec"][0] in ("2s", "5s"), name
        assert "network-online.target (origin-file)" in unit["Wants"], name
        assert "network-online.target (origin-file)" in unit["After"], name
    assert "remote-fs.target (origin-file)" in units["dorafs-mount@mnt-data.service"]["Before"]


def test_daemon_hardening(rendered):
    unit_dir, _ = rendered
    units = load_units(unit_dir, "dorafs-registry.service", "dorafs-worker@ssd1.service")
    for name, unit in units.items():
        for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                           "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
                           "ProtectControlGroups": "yes", "LockPersonality": "yes",
                           "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": ""}.items():
            assert unit[key] == [value], f"{name}: {key}={unit.get(key)}"
        text = (unit_dir / (name if "@" not in name else "dorafs-worker@.service")).read_text()
        assert re.search(r"^NoNewPrivileges=yes$", text, re.M), name
        assert re.search(r"^RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX$", text, re.M), name


def test_mount_unit_has_no_mount_namespace(rendered):
    """A FUSE mount made in a private mount namespace is invisible outside it: none of the
    options that give a service its own namespace may be set on the mount unit."""
    unit_dir, _ = rendered
    unit = load_units(unit_dir, "dorafs-mount@mnt-data.service")["dorafs-mount@mnt-data.service"]
    for key, value in {"PrivateTmp": "no", "PrivateDevices": "no", "ProtectKernelTunables": "no",
                       "ProtectKernelModules": "no", "ProtectKernelLogs": "no", "ProtectControlGroups": "no",
                       "ProtectHome": "no", "ProtectSystem": "no", "ProtectProc": "default", "ProcSubset": "all",
                       "DynamicUser": "no", "MountAPIVFS": "no", "RootDirectory": "/"}.items():
        assert unit[key] == [value], f"{key}={unit.get(key)}"
    text = (unit_dir / "dorafs-mount@.service").read_text()
    for key in ("ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths", "BindPaths",
                "BindReadOnlyPaths", "TemporaryFileSystem", "PrivateMounts", "MountFlags", "RootImage",
                "PrivateIPC", "PrivateNetwork", "User"):
        assert not re.search(rf"^{key}=", text, re.M), f"{key}= set on the mount unit"
    assert unit["CapabilityBoundingSet"] == ["cap_dac_read_search cap_sys_admin"]
    assert unit["DevicePolicy"] == ["closed"] and unit["DeviceAllow"] == ["/dev/fuse rw"]


# --- install.sh: /etc/dorafs, idempotence ---------------------------------------------------


def test_env_file_examples_name_real_config_keys():
    """Every DORAFS_<SECTION>_<KEY> in the examples is a key the daemons accept (an unknown
    one is a start-up error)."""
    from dorafs.config import SECTIONS, options

    for example in ENV_FILES:
        for match in re.finditer(r"^#?\s*(DORAFS_(WORKER|REGISTRY|MOUNT)_(\w+))=", (SYSTEMD / "env" / example).read_text(),
                                 re.M):
            section, key = match.group(2).lower(), match.group(3).lower()
            assert key in options(SECTIONS[section]), f"{example}: {match.group(1)} is not a [{section}] key"


def test_install_is_idempotent_and_keeps_env_files(tmp_path, rendered):
    root = tmp_path / "root"
    first = _run_install("--root", str(root))
    assert "daemon-reload" not in first.stdout
    conf = root / "etc/dorafs"
    for name in ENV_FILES:
        assert (conf / name).read_bytes() == (SYSTEMD / "env" / name).read_bytes()
        assert stat.S_IMODE((conf / name).stat().st_mode) == 0o600, name
    units = root / "etc/systemd/system"
    unit_dir, _ = rendered
    for unit in UNITS:
        assert (units / unit).read_bytes() == (unit_dir / unit).read_bytes(), unit
    assert (root / "etc/sysusers.d/dorafs.conf").is_file()
    if shutil.which("systemd-sysusers"):
        assert re.search(r"^dorafs:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.M)

    before = _snapshot(root)
    second = _run_install("--root", str(root))
    assert _snapshot(root) == before
    assert second.stdout.count("unchanged ") == len(UNITS) and second.stdout.count("kept ") == len(ENV_FILES)

    # An operator's edits survive; a stray edit to a unit is put right.
    (conf / "worker.env").write_text("DORAFS_WORKER_REGISTRY=http://10.0.0.1:19998\n")
    (conf / "worker-ssd1.env").write_text("DORAFS_WORKER_LISTEN=0.0.0.0:29998\n")
    (conf / "registry.env").unlink()
    (units / "dorafs-registry.service").write_text("[Service]\nExecStart=/bin/false\n")
    _run_install("--root", str(root))
    assert (conf / "worker.env").read_text() == "DORAFS_WORKER_REGISTRY=http://10.0.0.1:19998\n"
    assert (conf / "worker-ssd1.env").read_text() == "DORAFS_WORKER_LISTEN=0.0.0.0:29998\n"
    assert (conf / "registry.env").read_bytes() == (SYSTEMD / "env/registry.env").read_bytes()
    assert (units / "dorafs-registry.service").read_bytes() == (unit_dir / "dorafs-registry.service").read_bytes()


def _private_etc_possible() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_etc_possible(), reason="needs root and unshare --mount for a private /etc")
@pytest.mark.parametrize("pid1", [False, True], ids=["no-systemd", "systemd-pid1"])
def test_real_install_in_a_private_etc(tmp_path, pid1):
    """`sudo bash systemd/install.sh` with its default paths, on a copy of /etc bind-mounted
    over /etc in a private mount namespace (the real /etc is not touched): the user is
    created, /etc/dorafs filled, a second run changes nothing, and daemon-reload runs only
    when systemd is PID 1 (faked: /run/systemd/system on a private /run, and a stand-in
    systemctl) and is otherwise skipped with a message."""
    host_etc_before = (Path("/etc/dorafs").exists(), Path("/etc/systemd/system/dorafs-registry.service").exists())
    etc = tmp_path / "etc"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "systemctl-calls"
    (fake_bin / "systemctl").write_text(f"#!/bin/sh\necho \"$*\" >> {shlex.quote(str(calls))}\n")
    (fake_bin / "systemctl").chmod(0o755)
    run = f"PATH={shlex.quote(str(fake_bin))}:$PATH bash {shlex.quote(str(INSTALL))}"
    script = " && ".join([
        f"mount --bind {shlex.quote(str(etc))} /etc",
        "mount -t tmpfs tmpfs /run",  # a private /run: /run/systemd/system exists only if we say so
        *(["mkdir -p /run/systemd/system"] if pid1 else []),
        run,
        "echo SECOND RUN",
        run,
        "getent passwd dorafs",
    ])
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = result.stdout.split("SECOND RUN")
    assert re.search(r"^dorafs:x:\d+:\d+:dorafs cache worker:", second, re.M)
    assert "created user dorafs" in first and "user dorafs exists" in second
    for unit in UNITS:
        assert (etc / "systemd/system" / unit).is_file()
    assert sorted(p.name for p in (etc / "dorafs").iterdir()) == sorted(ENV_FILES)
    assert second.count("unchanged ") == len(UNITS) and second.count("kept ") == len(ENV_FILES)
    if pid1:
        assert calls.read_text().splitlines() == ["daemon-reload", "daemon-reload"]
        assert "systemctl daemon-reload: done" in first
    else:
        assert not calls.exists()
        assert "systemd is not running as PID 1" in first and "skipped systemctl daemon-reload" in first
    assert (Path("/etc/dorafs").exists(),
            Path("/etc/systemd/system/dorafs-registry.service").exists()) == host_etc_before
