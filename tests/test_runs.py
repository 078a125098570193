"""The frames of a run answer taken whole from what a reader has received (dorafs/runs.py)."""

from hypothesis import given
from hypothesis import strategies as st

from dorafs import runs


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def frame(kind: int, index: int, data: bytes = b"", checksum: str = "0011223344556677") -> bytes:
    return chunk(runs.header(kind, index, len(data), checksum)) + (chunk(data) if data else b"")


places = st.lists(st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64),
                            st.binary(min_size=8, max_size=8).map(bytes.hex)), max_size=6)


@given(places=places, cut=st.integers(0, 2000))
def test_whole_frames_takes_exactly_the_frames_received_whole(places, cut):
    wire = b"".join(frame(runs.PLACE, index, data, checksum) for index, data, checksum in places) + b"0\r\n\r\n"
    received = bytearray(wire[:cut])
    frames, used = runs.whole_frames(received, runs.PLACE)
    ends = []
    at = 0
    for index, data, checksum in places:
        at += len(frame(runs.PLACE, index, data, checksum))
        ends.append(at)
    whole = sum(1 for end in ends if end <= cut)
    assert [(index, data, checksum) for index, _, checksum, data in frames] == places[:whole]
    assert all(length == len(data) for _, length, _, data in frames)
    assert used == (ends[whole - 1] if whole else 0)


def test_whole_frames_stops_before_what_the_reader_reads_itself():
    place = frame(runs.PLACE, 3, b"/cache/f\n0")
    error = frame(runs.ERROR, 4, b'{"status": 502}')
    wait = frame(runs.WAIT, 4)
    for after in (error, wait, b"0\r\n\r\n", b"zz\r\n", frame(runs.PAGE, 4, b"bytes")):
        frames, used = runs.whole_frames(bytearray(place + after + place), runs.PLACE)
        assert [f[0] for f in frames] == [3] and used == len(place), after
    # a data chunk whose size is not the header's length is not taken: the reader's own
    # parse raises for it
    bad = chunk(runs.header(runs.PLACE, 5, 4, "0011223344556677")) + chunk(b"12345")
    assert runs.whole_frames(bytearray(bad), runs.PLACE) == ([], 0)
