"""The wire format of a run of pages: one worker answer carrying several pages.

`GET /v1/run` answers with a chunked body of frames. Every frame starts with a header
chunk of `HEADER.size` bytes (kind, length, page index, xxh3-64 checksum); a PAGE frame's
header is followed by one chunk of exactly `length` page bytes, an ERROR frame's by one
chunk of `length` bytes of JSON (`{errno, message, status}`: why page `index` and those
after it do not come). A WAIT frame has no data: the worker is still filling the next
page and says so (the reader's timeout counts silence). Pages come in index order as
each lands; the body's end (a zero chunk) ends the run, which may stop early (at an
ERROR, or at a page that could not be read back): the reader asks for what is missing
page by page.

`GET /v1/locate?stream=1` (a reader on the worker's machine) answers with the same
frames, but a PLACE frame instead of each PAGE: its data is where the page's bytes are,
`<path>\n<offset>` in UTF-8, for the reader to read from the file itself.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<B3xIQ8s")  # kind, length, index, checksum (raw xxh3-64, big-endian)
PAGE, WAIT, ERROR, PLACE = 1, 2, 3, 4


def header(kind: int, index: int = 0, length: int = 0, checksum: str = "") -> bytes:
    return HEADER.pack(kind, length, index, bytes.fromhex(checksum) if checksum else b"\0" * 8)


def parse(data: bytes | bytearray | memoryview) -> tuple[int, int, int, str]:
    """(kind, index, length, checksum as hex) of a frame header."""
    kind, length, index, digest = HEADER.unpack(data)
    return kind, index, length, digest.hex()
