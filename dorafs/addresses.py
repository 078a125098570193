"""How addresses are written: `HOST:PORT`, a registry URL and an etcd URL.

Pure parsing, importing nothing of dorafs: the configuration checks these spellings when it
reads them, and the membership sources use them to connect, without either importing the
other.
"""

from __future__ import annotations

from urllib.parse import urlsplit

ETCD_SCHEME = "etcd"
ETCD_DEFAULT_NAMESPACE = "dorafs"


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`'127.0.0.1:29998'`, `':29998'` or `'29998'` -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isascii() or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        raise ValueError(f"not HOST:PORT: {text!r} (IPv6 hosts go in brackets: [::1]:29998)")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return (host.strip("[]") or default_host, number)


def registry_url(text: str) -> str:
    """`'127.0.0.1:19998'` or `'http://host:port/'` -> `'http://host:port'`."""
    text = text.strip().rstrip("/")
    return text if "://" in text else f"http://{text}"


def is_etcd(url: str | None) -> bool:
    return bool(url) and url.strip().lower().startswith(f"{ETCD_SCHEME}://")


def parse_etcd_url(url: str) -> tuple[list[str], str]:
    """`etcd://h1:2379,h2:2379/ns` -> (['http://h1:2379', 'http://h2:2379'], '/ns/workers/').

    '+' also separates endpoints, for `mount -o registry=...` where ',' separates options.
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != ETCD_SCHEME or not parts.netloc:
        raise ValueError(f"not an etcd URL (etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]): {url!r}")
    endpoints = []
    for item in parts.netloc.replace("+", ",").split(","):
        try:
            host, port = parse_hostport(item.strip(), default_host="")
        except ValueError:
            host, port = "", 0
        if not host or not port:
            raise ValueError(f"etcd endpoint {item!r} in {url!r} needs HOST:PORT")
        endpoints.append(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
    namespace = parts.path.strip("/") or ETCD_DEFAULT_NAMESPACE
    return endpoints, f"/{namespace}/workers/"
