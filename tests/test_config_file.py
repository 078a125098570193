"""One TOML config file for every program: precedence, errors, and the reference page."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from dorafs.config import ConfigError, load_config, reference_markdown
from tests.cluster import REPO, _env
from tests.support import wait_for


def test_reference_page_matches_the_code():
    text = (REPO / "docs" / "CONFIG.md").read_text()
    generated = text.split("<!-- generated:begin -->")[1].split("<!-- generated:end -->")[0]
    assert generated.strip() == reference_markdown().strip(), "run: python3 -m dorafs.config"


def write(tmp_path, text: str):
    path = tmp_path / "dorafs.toml"
    path.write_text(text)
    return path


def test_precedence_defaults_file_environment_command_line(tmp_path):
    path = write(tmp_path, '[worker]\ncache_size = "2GiB"\npage_size = "2MiB"\nstatus_ttl = 30\n'
                           '[mount]\nattr_timeout = "3s"\n')
    env = {"DORAFS_WORKER_PAGE_SIZE": "4MiB", "DORAFS_WORKER_LISTING_TTL": "-1"}
    config = load_config("worker", {"status_ttl": "5s"}, config_path=path, env=env)
    assert config.cache_size == 2 << 30  # file over default
    assert config.page_size == 4 << 20  # environment over file
    assert config.status_ttl == 5.0  # command line over file
    assert config.listing_ttl == -1.0  # environment over default
    assert config.ufs_threads == 16  # default
    mount = load_config("mount", {}, config_path=path, env={})
    assert mount.attr_timeout == 3.0 and mount.cache_size == 10 << 30


def test_default_file_is_optional_but_an_explicit_one_must_exist(tmp_path):
    assert load_config("registry", {}, env={}).worker_ttl == 10.0
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("registry", {}, config_path=tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("registry", {}, env={"DORAFS_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize("text, message", [
    ('[worker]\ncache_sise = "1GiB"\n', r"unknown key worker\.cache_sise"),
    ('[worker]\ncache_size = "lots"\n', r"worker\.cache_size: .*'lots'"),
    ('[worker]\ncache_size = 0\n', r"worker\.cache_size: must be a positive size"),
    ('[worker]\nheartbeat_interval = "-1s"\n', r"worker\.heartbeat_interval: must be positive"),
    ('[worker]\nlisten = "::1"\n', r"worker\.listen: not HOST:PORT"),
    ('[workers]\nlisten = "a:1"\n', r"unknown section \[workers\]"),
    ('[worker\n', r"config file .*dorafs\.toml"),
    ('worker = 3\n', r"worker must be a \[worker\] table"),
])
def test_bad_files_name_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config("worker", {}, config_path=path, env={})
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"environment DORAFS_MOUNT_READAHEAD_PAGES: mount\.readahead_pages"):
        load_config("mount", {}, env={"DORAFS_MOUNT_READAHEAD_PAGES": "many"})


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                          env={**_env(), **(env or {})}, timeout=60)


@pytest.mark.parametrize("program, section", [("worker.main", "worker"), ("registry.main", "registry")])
def test_daemons_refuse_a_bad_file_with_one_line(tmp_path, program, section):
    path = write(tmp_path, f'[{section}]\nlisten = "nowhere"\n')
    result = _run([program, "--config", str(path)])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"{section}.listen" in result.stderr, result.stderr


def test_mount_refuses_a_bad_file_with_one_line(tmp_path):
    path = write(tmp_path, '[mount]\nattr_timeout = "soon"\n')
    (tmp_path / "mnt").mkdir()
    result = _run(["dorafs.cli.main", "mount", "file:///tmp", str(tmp_path / "mnt"), "-o", f"config={path}"])
    assert result.returncode == 2
    assert result.stderr.startswith("dorafs: ") and "mount.attr_timeout" in result.stderr
    assert result.stderr.count("\n") == 1


def test_worker_takes_file_environment_and_flags_in_order(tmp_path):
    port_file = tmp_path / "addr"
    path = write(tmp_path, f'[worker]\nlisten = "127.0.0.1:0"\ncache_dir = "{tmp_path / "cache"}"\n'
                           f'cache_size = "1GiB"\npage_size = "512KiB"\nport_file = "{port_file}"\n')
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "worker.main", "--config", str(path), "--cache-size", "3MiB"],
                            cwd=REPO, env={**_env(), "DORAFS_WORKER_PAGE_SIZE": "2MiB"}, stdout=log, stderr=log)
    try:
        address = wait_for(lambda: port_file.exists() and port_file.read_text().strip(), what="worker")
        info = httpx.get(f"http://{address}/v1/info", timeout=5).json()
        assert info["capacity"] == 3 << 20  # the flag wins over the file
        assert info["page_size"] == 2 << 20  # the environment wins over the file
        assert (tmp_path / "cache" / "pages").is_dir()  # the file's cache_dir
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
