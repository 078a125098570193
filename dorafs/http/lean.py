"""The common request, read and answered without h11.

Why: profiling a remote small read (bench/workerhop.py) put about 40% of the worker's
CPU in h11's parsing of the request and framing of the answer. Nearly every request a
worker gets is the same shape: a GET (or HEAD) from the mount's worker client, its head
whole in one receive, no body. Such a request is parsed here with two regular
expressions, and its answer framed with string formatting.

Anything else goes to h11, which the connection then uses for the rest of its life
(dorafs/http/server.py): another method, a request body, `Transfer-Encoding`, `Expect`,
`Upgrade`, a repeated header, a missing `Host`, a target that is not a path, any byte
the grammar below does not allow, a head longer than the server's limit or not yet
whole in the bytes received (`//` or `#` in the target included). So every unusual request keeps h11's checks and answers;
this module only ever says "mine" to a request h11 would accept as it is.
"""

from __future__ import annotations

import re
from http import HTTPStatus

# RFC 9110 tokens; field values of visible ASCII with inner spaces and tabs; a target in
# origin form (a path and query) of visible ASCII.
_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[\x21-\x7e]*) HTTP/1\.1")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?)[ \t]*")
_NOT_HERE = frozenset(("content-length", "transfer-encoding", "expect", "upgrade"))  # h11 frames these
_REASONS = {status.value: status.phrase for status in HTTPStatus}

INTERIM = b"HTTP/1.1 102 Processing\r\n\r\n"
CHUNK_END = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, target, fields by lowercase name) of a request head without its final
    empty line; None when h11 is to read this request."""
    lines = head.split(b"\r\n")
    first = _REQUEST_LINE.fullmatch(lines[0])
    if first is None or first[2].startswith(b"//") or b"#" in first[2]:  # not a plain path: h11's
        return None
    fields: dict[str, str] = {}
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:
            return None
        name = field[1].decode("ascii").lower()
        if name in fields or name in _NOT_HERE:
            return None
        fields[name] = field[2].decode("ascii")
    if "host" not in fields:
        return None
    return first[1].decode("ascii"), first[2].decode("ascii"), fields


def wants_close(fields: dict[str, str]) -> bool:
    return "close" in fields.get("connection", "").lower()


def response_head(status: int, fields: list[tuple[str, str]]) -> bytes:
    """An answer's status line and fields, ready to send. A field that could end the
    head early (a CR or LF in it) is a bug of the handler: ValueError."""
    out = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"]
    for name, value in fields:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value or ":" in name:
            raise ValueError(f"answer field {name!r} cannot be sent")
        out.append(f"{name}: {value}\r\n")
    out.append("\r\n")
    return "".join(out).encode("latin-1")


def chunk_head(length: int) -> bytes:
    return b"%x\r\n" % length
