"""The cluster secret and TLS: who may talk to a daemon, and over what.

Subtleties:
- The secret comes from a file (`secret_file`, owner-only: a file that the group or
  others may read is refused) or from `$DORAFS_SECRET`. It is never a configuration key
  (config files are often world-readable) nor a command-line flag (every local user sees
  argv in `ps`), and it is never passed to a logger.
- On the wire it is a bearer token, `Authorization: Bearer <secret>`, compared in
  constant time (`hmac.compare_digest`). It is only as private as the link: use TLS on
  any network that other machines share.
- TLS: a daemon with `tls_cert` and `tls_key` speaks only TLS on its port; a client with
  `tls_ca` speaks only TLS and trusts that CA alone (point it at the system bundle for a
  public CA). Certificates must name the address clients dial (an IP SAN for an IP).
- `Credentials` is what a client presents: the token header and the TLS context; one
  object, built once from the config, handed to every client of a process.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dorafs.config import ConfigError

SECRET_ENV = "DORAFS_SECRET"
MIN_SECRET_CHARS = 16  # `openssl rand -hex 32` gives 64


def read_secret(path: Path | None, env: Mapping[str, str] | None = None) -> bytes | None:
    """The cluster secret from `path` (mode 0600 or stricter) or $DORAFS_SECRET; None if neither.

    Raises ConfigError with a one-line message that never contains the secret.
    """
    env = os.environ if env is None else env
    if path is not None:
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise ConfigError(f"secret file {path} is accessible to group or others "
                                      f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}")
                raw = f.read(4096)
        except OSError as exc:
            raise ConfigError(f"secret file {path}: {exc.strerror}") from None
        source = f"secret file {path}"
        text = raw.decode("ascii", "replace").strip()
    elif env.get(SECRET_ENV):
        source, text = f"environment {SECRET_ENV}", env[SECRET_ENV].strip()
    else:
        return None
    if len(text) < MIN_SECRET_CHARS:
        raise ConfigError(f"{source}: the secret must have at least {MIN_SECRET_CHARS} characters")
    if not all("!" <= c <= "~" for c in text):
        raise ConfigError(f"{source}: the secret must be printable ASCII without spaces "
                          "(e.g. the output of `openssl rand -hex 32`)")
    return text.encode("ascii")


def server_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A TLS server context from a certificate chain and its key; None when neither is set."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls_cert {cert} / tls_key {key}: {exc}") from None
    return context


def client_context(ca: Path | None) -> ssl.SSLContext | None:
    """A TLS client context trusting exactly the CA bundle `ca`; None for plain HTTP."""
    if ca is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls_ca {ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True)
class Credentials:
    """What a client presents to workers and registries: the token and the TLS context."""

    secret: bytes | None = None
    ssl: ssl.SSLContext | None = None

    @classmethod
    def from_config(cls, config, env: Mapping[str, str] | None = None) -> Credentials:
        return cls(read_secret(config.secret_file, env), client_context(config.tls_ca))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret.decode()}"} if self.secret else {}

    @property
    def scheme(self) -> str:
        return "https" if self.ssl is not None else "http"

    def httpx_options(self) -> dict:
        """Keyword arguments for an httpx client: the token and what to verify TLS with."""
        return {"headers": self.headers, "verify": self.ssl if self.ssl is not None else True}

    def __repr__(self) -> str:  # never show the secret, even in a traceback's locals
        return f"Credentials(secret={'set' if self.secret else 'unset'}, tls={self.ssl is not None})"


@dataclass(frozen=True)
class ServerSecurity:
    """What a daemon's port demands: the secret on every path but `open_paths`, and TLS."""

    secret: bytes | None = None
    tls: ssl.SSLContext | None = None
    open_paths: frozenset[str] = frozenset(("/healthz",))

    @classmethod
    def from_config(cls, config, env: Mapping[str, str] | None = None) -> ServerSecurity:
        open_paths = {"/healthz"} | (set() if config.metrics_auth else {"/metrics"})
        return cls(read_secret(config.secret_file, env), server_context(config.tls_cert, config.tls_key),
                   frozenset(open_paths))

    def apply(self, server) -> None:
        server.secure(self.secret, self.tls, self.open_paths)

    def describe(self) -> str:
        return (f"{'TLS' if self.tls else 'plain HTTP'}, "
                f"{'cluster secret required' if self.secret else 'no authentication'}")

    def __repr__(self) -> str:
        return f"ServerSecurity(secret={'set' if self.secret else 'unset'}, tls={self.tls is not None})"
