"""The frame walker: the C accelerator and the pure-Python fallback must agree byte for byte."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_plane.postgres import framescan
from data_plane.postgres.framescan import FrameError, FrameTooLarge, ScanResult

Scan = Callable[..., ScanResult]
MAX_LEN = 1 << 30
D, C, Z, T = ord("D"), ord("C"), ord("Z"), ord("T")

_c_scan = pytest.param(
    framescan._framescan.scan_frames if framescan.ACCELERATED else None,
    id="c",
    marks=pytest.mark.skipif(not framescan.ACCELERATED, reason="C accelerator not compiled"),
)
IMPLEMENTATIONS = [_c_scan, pytest.param(framescan._scan_frames_py, id="python")]


def frame(msg_type: bytes, payload: bytes = b"") -> bytes:
    return msg_type + struct.pack("!i", len(payload) + 4) + payload


def header(msg_type: bytes, length: int) -> bytes:
    return msg_type + struct.pack("!i", length)


def test_exports_the_documented_api() -> None:
    assert set(framescan.__all__) == {"ACCELERATED", "FrameError", "FrameTooLarge", "scan_frames"}
    assert issubclass(FrameTooLarge, FrameError)
    expected = framescan._framescan.scan_frames if framescan.ACCELERATED else framescan._scan_frames_py
    assert framescan.scan_frames is expected


@pytest.mark.parametrize("scan", IMPLEMENTATIONS)
class TestHandBuiltStreams:
    def test_empty_buffer_yields_nothing(self, scan: Scan) -> None:
        assert scan(b"", 0, b"D", MAX_LEN) == (0, [], 0)

    def test_one_complete_frame_is_one_event(self, scan: Scan) -> None:
        stream = frame(b"Z", b"I")
        assert scan(stream, 0, b"D", MAX_LEN) == (6, [(Z, 0, 6, 0)], 0)

    def test_frame_without_payload_is_complete_at_five_bytes(self, scan: Scan) -> None:
        assert scan(frame(b"1"), 0, b"", MAX_LEN) == (5, [(ord("1"), 0, 5, 0)], 0)

    @pytest.mark.parametrize("cut", [1, 2, 3, 4])
    def test_partial_header_is_left_alone(self, scan: Scan, cut: int) -> None:
        stream = frame(b"C", b"SELECT 1\x00")
        assert scan(stream[:cut], 0, b"D", MAX_LEN) == (0, [], 0)

    def test_partial_body_is_left_alone_after_complete_frames(self, scan: Scan) -> None:
        complete = frame(b"D", b"\x00\x01\x00\x00\x00\x01x")
        partial = frame(b"C", b"SELECT 1\x00")[:-1]
        assert scan(complete + partial, 0, b"D", MAX_LEN) == (len(complete), [], 1)

    def test_result_set_reports_skipped_rows_and_trailing_count(self, scan: Scan) -> None:
        row_description = frame(b"T", b"\x00\x01a\x00" + bytes(18))
        row = frame(b"D", b"\x00\x01\x00\x00\x00\x03abc")
        complete = frame(b"C", b"SELECT 1000\x00")
        ready = frame(b"Z", b"I")
        stream = row_description + row * 1000 + complete + ready + row * 3
        rows_end = len(row_description) + 1000 * len(row)
        assert scan(stream, 0, b"D", MAX_LEN) == (
            len(stream),
            [
                (T, 0, len(row_description), 0),
                (C, rows_end, len(complete), 1000),
                (Z, rows_end + len(complete), len(ready), 0),
            ],
            3,
        )

    def test_start_in_the_middle_reports_offsets_in_the_whole_buffer(self, scan: Scan) -> None:
        row = frame(b"D", b"\x00\x00")
        stream = b"garbage" + row * 2 + frame(b"Z", b"T")
        assert scan(stream, 7, b"D", MAX_LEN) == (len(stream), [(Z, 7 + 2 * len(row), 6, 2)], 0)

    def test_start_at_the_end_yields_nothing(self, scan: Scan) -> None:
        stream = frame(b"Z", b"I")
        assert scan(stream, len(stream), b"D", MAX_LEN) == (len(stream), [], 0)

    @pytest.mark.parametrize("start", [-1, 7])
    def test_start_outside_the_buffer_is_refused(self, scan: Scan, start: int) -> None:
        with pytest.raises(ValueError, match="outside the buffer"):
            scan(frame(b"Z", b"I"), start, b"D", MAX_LEN)

    def test_empty_skip_set_makes_every_frame_an_event(self, scan: Scan) -> None:
        stream = frame(b"D", b"\x00\x00") + frame(b"D", b"\x00\x00") + frame(b"Z", b"I")
        assert scan(stream, 0, b"", MAX_LEN) == (len(stream), [(D, 0, 7, 0), (D, 7, 7, 0), (Z, 14, 6, 0)], 0)

    def test_several_skipped_types(self, scan: Scan) -> None:
        stream = frame(b"D") + frame(b"d") + frame(b"Z", b"I") + frame(b"d")
        assert scan(stream, 0, b"dD", MAX_LEN) == (len(stream), [(Z, 10, 6, 2)], 1)

    @pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda wrap: wrap.__name__)
    def test_accepts_any_byte_buffer(self, scan: Scan, wrap: Callable[[bytes], object]) -> None:
        stream = frame(b"D", b"\x00\x00") + frame(b"Z", b"I") + b"C\x00"
        assert scan(wrap(stream), 0, b"D", MAX_LEN) == (13, [(Z, 7, 6, 1)], 0)

    def test_accepts_a_sliced_memoryview(self, scan: Scan) -> None:
        stream = b"xx" + frame(b"Z", b"I") + b"yy"
        assert scan(memoryview(stream)[2:-2], 0, b"D", MAX_LEN) == (6, [(Z, 0, 6, 0)], 0)

    def test_accepts_a_bytearray_skip_set(self, scan: Scan) -> None:
        assert scan(frame(b"D"), 0, bytearray(b"D"), MAX_LEN) == (5, [], 1)

    @pytest.mark.parametrize("length", [0, 1, 3])
    def test_length_below_four_is_a_frame_error(self, scan: Scan, length: int) -> None:
        stream = frame(b"Z", b"I") + header(b"D", length)
        with pytest.raises(FrameError, match="invalid frame length") as raised:
            scan(stream, 0, b"D", MAX_LEN)
        assert type(raised.value) is FrameError

    @pytest.mark.parametrize("length", [-1, -(2**31), -4])
    def test_negative_length_is_a_frame_error(self, scan: Scan, length: int) -> None:
        with pytest.raises(FrameError, match=str(length)) as raised:
            scan(header(b"D", length) + b"\x00" * 8, 0, b"D", MAX_LEN)
        assert type(raised.value) is FrameError

    def test_length_above_max_is_frame_too_large_with_its_attributes(self, scan: Scan) -> None:
        stream = frame(b"Z", b"I") + frame(b"D", b"x" * 100)
        with pytest.raises(FrameTooLarge) as raised:
            scan(stream, 0, b"D", 100)
        assert (raised.value.msg_type, raised.value.length) == (D, 104)

    def test_frame_too_large_is_raised_from_the_header_alone(self, scan: Scan) -> None:
        with pytest.raises(FrameTooLarge) as raised:
            scan(header(b"d", 2**31 - 1), 0, b"", 1 << 20)
        assert (raised.value.msg_type, raised.value.length) == (ord("d"), 2**31 - 1)

    def test_frame_exactly_max_len_is_accepted(self, scan: Scan) -> None:
        stream = frame(b"D", b"x" * 96)
        assert scan(stream, 0, b"D", 100) == (101, [], 1)

    def test_frame_too_large_is_caught_as_a_frame_error(self, scan: Scan) -> None:
        with pytest.raises(FrameError):
            scan(header(b"D", 1000), 0, b"D", 10)


# A stream is a list of frames; the reference parse below shares no code with either implementation.
frame_types = st.sampled_from(b"DCZTEdN")
frame_lists = st.lists(st.tuples(frame_types, st.binary(max_size=40)), max_size=30)
skip_sets = st.sampled_from([b"", b"D", b"Dd", b"DCZTEdN"])
# Arbitrary bytes rarely hold a plausible length, so mix in real headers with small, odd and negative lengths.
type_bytes = frame_types.map(lambda msg_type: bytes([msg_type]))
wire_fragments = st.one_of(
    st.binary(max_size=6),
    st.builds(header, type_bytes, st.integers(-8, 80)),
    st.builds(frame, type_bytes, st.binary(max_size=40)),
)
Located = tuple[int, int, int]  # (msg_type, absolute offset in the whole stream, size)


def reference_parse(frames_in_stream: list[tuple[int, bytes]], skip: bytes) -> tuple[list[Located], list[int], int]:
    """(msg_type, absolute offset, size) of each event, frames skipped before each event, and after the last."""
    events: list[Located] = []
    skipped_before: list[int] = []
    skipped = offset = 0
    for msg_type, payload in frames_in_stream:
        size = 5 + len(payload)
        if msg_type in skip:
            skipped += 1
        else:
            events.append((msg_type, offset, size))
            skipped_before.append(skipped)
            skipped = 0
        offset += size
    return events, skipped_before, skipped


def relay_chunks(
    stream: bytes, cuts: list[int], skip: bytes, scan: Scan
) -> tuple[list[Located], list[int], int, bytes]:
    """Feed the stream as the relay reads it: keep the unconsumed tail, append the next chunk, scan from 0."""
    bounds = [0, *sorted(cuts), len(stream)]
    pending = bytearray()
    consumed = 0
    events: list[Located] = []
    skipped_before: list[int] = []
    carried = 0  # skipped frames reported as trailing by earlier reads, owed to the next event
    for low, high in itertools.pairwise(bounds):
        pending += stream[low:high]
        end, chunk_events, trailing = scan(pending, 0, skip, MAX_LEN)
        if framescan.ACCELERATED and scan is not framescan._scan_frames_py:
            assert framescan._scan_frames_py(bytes(pending), 0, skip, MAX_LEN) == (end, chunk_events, trailing)
        for msg_type, offset, size, before in chunk_events:
            events.append((msg_type, consumed + offset, size))
            skipped_before.append(carried + before)
            carried = 0
        carried += trailing
        del pending[:end]
        consumed += end
    return events, skipped_before, carried, bytes(pending)


@pytest.mark.parametrize("scan", IMPLEMENTATIONS)
@settings(max_examples=200, deadline=None)
@given(frames=frame_lists, skip=skip_sets, data=st.data())
def test_chunked_relay_matches_a_whole_stream_parse(
    scan: Scan, frames: list[tuple[int, bytes]], skip: bytes, data: st.DataObject
) -> None:
    stream = b"".join(frame(bytes([msg_type]), payload) for msg_type, payload in frames)
    # A truncated last frame must stay pending, never be reported.
    torn = data.draw(st.binary(max_size=4) | st.just(frame(b"D", b"tail")[:-1]), label="torn tail")
    cuts = data.draw(st.lists(st.integers(0, len(stream) + len(torn)), max_size=12), label="cuts")

    events, skipped_before, trailing, pending = relay_chunks(stream + torn, cuts, skip, scan)

    assert (events, skipped_before, trailing) == reference_parse(frames, skip)
    assert pending == torn


@settings(max_examples=200, deadline=None)
@given(raw=st.lists(wire_fragments, max_size=10).map(b"".join), skip=skip_sets, data=st.data())
def test_c_and_python_agree_on_arbitrary_bytes(raw: bytes, skip: bytes, data: st.DataObject) -> None:
    if not framescan.ACCELERATED:
        pytest.skip("C accelerator not compiled")
    start = data.draw(st.integers(0, len(raw) + 1), label="start")  # one past the end: ValueError from both
    max_len = data.draw(st.integers(0, 100), label="max_len")

    def outcome(scan: Scan) -> object:
        try:
            return scan(raw, start, skip, max_len)
        except FrameTooLarge as too_large:
            return ("too large", too_large.msg_type, too_large.length)
        except (FrameError, ValueError) as error:
            return (type(error), str(error))

    assert outcome(framescan._framescan.scan_frames) == outcome(framescan._scan_frames_py)
