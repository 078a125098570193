"""In-process tests of the configuration parsers (dorafs/config.py)."""

from __future__ import annotations

import re

import pytest

from dorafs.addresses import parse_hostport
from dorafs.config import parse_duration, parse_size


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096),
    ("0", 0),
    ("1b", 1),
    ("1B", 1),
    ("512k", 512 << 10),
    ("1kb", 1000),
    ("1KiB", 1024),
    ("1MiB", 1 << 20),
    ("1mb", 10**6),
    ("1M", 1 << 20),
    ("10GiB", 10 << 30),
    ("2gb", 2 * 10**9),
    ("1TiB", 1 << 40),
    ("1tb", 10**12),
    ("1.5MiB", 3 << 19),
    (" 64 MiB ", 64 << 20),
    (8192, 8192),
])
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("text", [
    "", " ", "MiB", "-1", "-1MiB", "1 XiB", "1e3", "ten", "1.MiB", ".5MiB", "1,024", "1 MiB B", "0x10",
])
def test_parse_size_bad(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_size(text)


@pytest.mark.parametrize("text,expected", [
    ("10", 10.0),
    ("1.5", 1.5),
    ("-1", -1.0),
    ("0", 0.0),
    ("500ms", 0.5),
    ("10s", 10.0),
    ("10S", 10.0),
    ("2m", 120.0),
    ("2min", 120.0),
    ("1h", 3600.0),
    (" 250 ms ", 0.25),
    ("-1s", -1.0),
    (3, 3.0),
    (0.25, 0.25),
])
def test_parse_duration_good(text, expected):
    value = parse_duration(text)
    assert value == pytest.approx(expected) and isinstance(value, float)


@pytest.mark.parametrize("text", ["", "s", "10 years", "1d", "1e3", "--1", "1..5s", "fast", "10 s s"])
def test_parse_duration_bad(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_duration(text)


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:29998", ("127.0.0.1", 29998)),
    (":29998", ("127.0.0.1", 29998)),
    ("29998", ("127.0.0.1", 29998)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("localhost:65535", ("localhost", 65535)),
    ("worker-3.example:80", ("worker-3.example", 80)),
    ("[::1]:8080", ("::1", 8080)),
    ("[::]:1", ("::", 1)),
])
def test_parse_hostport_good(text, expected):
    assert parse_hostport(text) == expected


def test_parse_hostport_default_host():
    assert parse_hostport(":80", default_host="0.0.0.0") == ("0.0.0.0", 80)
    assert parse_hostport("80", default_host="::1") == ("::1", 80)


@pytest.mark.parametrize("text", [
    "", "host", "host:", "host:port", ":", "127.0.0.1:65536", "127.0.0.1:-1", "99999", "1.5", "[::1]:",
])
def test_parse_hostport_bad(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_hostport(text)


@pytest.mark.parametrize("text", ["::1", "h:8_0", "h:+80", "h:٨٠"])
def test_parse_hostport_rejects_ambiguous_or_odd_ports(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hostport(text)


def test_parse_hostport_bracketed_ipv6():
    assert parse_hostport("[::1]:29998") == ("::1", 29998)


def test_parse_size_is_exact_for_large_integers():
    assert parse_size(str(2**60 + 1)) == 2**60 + 1
    assert parse_size("3TiB") == 3 << 40
