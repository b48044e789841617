"""Frame boundaries of a PostgreSQL typed message stream, without decoding the messages.

The relay forwards what it reads untouched, but it must know where each frame ends and where the
few messages it acts on (RowDescription, CommandComplete, ErrorResponse, ReadyForQuery...) sit.
`scan_frames` walks the headers of one read; frames of the types in `skip` (DataRows on a
result nobody masks) are only counted. A C accelerator does the walk when it was compiled
(`ACCELERATED`); the pure-Python fallback below behaves identically.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["ACCELERATED", "FrameError", "FrameTooLarge", "scan_frames"]

ByteStream = bytes | bytearray | memoryview
# One event per complete frame not in `skip`: (msg_type, offset of its type byte, 1 + length, frames skipped before it)
FrameEvent = tuple[int, int, int, int]
ScanResult = tuple[int, list[FrameEvent], int]

_HEADER = struct.Struct("!Bi")  # type byte, then a signed int32 length that counts itself


class FrameError(Exception):
    """The stream is malformed: a frame declares a length below the 4 bytes of the length itself."""


class FrameTooLarge(FrameError):
    """A frame declares more bytes than the relay is willing to buffer."""

    def __init__(self, msg_type: int, length: int) -> None:
        super().__init__(f"frame of type 0x{msg_type:02x} declares {length} bytes, more than allowed")
        self.msg_type = msg_type
        self.length = length


def _scan_frames_py(buf: ByteStream, start: int, skip: bytes, max_len: int) -> ScanResult:
    """Walk complete frames of a typed PostgreSQL message stream in buf[start:].

    A frame is 1 type byte, a big-endian int32 length that counts itself (not the type byte), then
    length - 4 payload bytes. Returns (end, events, trailing_skipped): `end` is the offset just past
    the last complete frame (a partial frame at the end is left alone); `events` holds
    (msg_type, offset_of_type_byte, 1 + length, skipped_before) for each complete frame whose type
    is not in `skip`, where skipped_before counts the skipped frames since the previous event (or
    `start`); `trailing_skipped` counts those after the last event. Raises FrameError for a
    declared length below 4 and FrameTooLarge above `max_len`, as soon as the 5-byte header is
    there.
    """
    data = memoryview(buf)
    if data.format != "B" or data.ndim != 1:
        data = data.cast("B")
    size = len(data)
    if not 0 <= start <= size:
        raise ValueError(f"start {start} is outside the buffer of {size} bytes")
    unpack_header = _HEADER.unpack_from
    events: list[FrameEvent] = []
    skipped = 0
    pos = start
    while size - pos >= 5:
        msg_type, length = unpack_header(data, pos)
        if length < 4:
            raise FrameError(f"invalid frame length {length} for message type 0x{msg_type:02x} at offset {pos}")
        if length > max_len:
            raise FrameTooLarge(msg_type, length)
        if length > size - pos - 1:
            break  # body incomplete: leave the partial frame for the next read
        if msg_type in skip:
            skipped += 1
        else:
            events.append((msg_type, pos, length + 1, skipped))
            skipped = 0
        pos += length + 1
    return pos, events, skipped


try:
    from data_plane.postgres import _framescan
except ImportError:  # no compiler where this was installed: the fallback is correct, only slower
    _framescan = None

scan_frames: Callable[[ByteStream, int, bytes, int], ScanResult]
if _framescan is not None:
    _framescan._set_errors(FrameError, FrameTooLarge)
    scan_frames = _framescan.scan_frames
    ACCELERATED = True
else:
    scan_frames = _scan_frames_py
    ACCELERATED = False
