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


def whole_frames(buf: bytes | bytearray, kind: int) -> tuple[list[tuple[int, int, str, bytes]], int]:
    """The frames of `kind` that `buf` (the bytes of a chunked answer received and not
    yet read, starting at a chunk's size line) holds whole, header and data, from its
    start: ([(index, length, checksum as hex, data), ...], how many bytes they take).
    It stops before anything else (another kind, a WAIT, a frame not wholly received,
    the answer's end, a line it does not read as a size), which the reader then reads
    the usual way, where a malformed answer is an error.

    A worker sends the frames of the pages that landed together in one write: their
    reader takes them at once here, with no wait and one parse each, instead of two
    chunks per frame read one at a time."""
    frames = []
    at = taken = 0
    end = len(buf)
    while True:
        head = _whole_chunk(buf, at, end)
        if head is None or head[1] != HEADER.size:
            break
        got, length, index, digest = HEADER.unpack_from(buf, head[0])
        if got != kind or not length:
            break
        data = _whole_chunk(buf, head[0] + HEADER.size + 2, end)
        if data is None or data[1] != length:
            break
        frames.append((index, length, digest.hex(), bytes(buf[data[0]:data[0] + length])))
        at = taken = data[0] + length + 2
    return frames, taken


def _whole_chunk(buf: bytes | bytearray, at: int, end: int) -> tuple[int, int] | None:
    """(where its data starts, its size) of the chunk whose size line starts at `at`,
    if buf[:end] holds all of it and its closing CRLF; None otherwise."""
    line = buf.find(b"\r\n", at, at + 18)
    if line <= at:
        return None
    try:
        size = int(buf[at:line], 16)
    except ValueError:
        return None
    data = line + 2
    if data + size + 2 > end or buf[data + size:data + size + 2] != b"\r\n":
        return None
    return data, size
