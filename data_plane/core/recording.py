"""Session recordings: an append-only stream of records with a SHA-256 hash chain.

On disk (the spool) and in each shipped chunk a record is
    header  !QdBBI  seq, unix time, direction, kind, payload length
    payload
    hash    sha256(previous hash || header || payload)
and the chain starts from sha256(b"proctor-recording:" + session id), so records cannot be
changed, dropped or reordered without breaking every later hash. Chunks are contiguous runs of
records; the chain runs on from one chunk to the next.

Durability (the fsync policy): each record is written with one `writev` (the C data path copies
it into a mapping of the file instead: _spoolmap.h) before the bytes it describes are relayed, so a
gateway killed mid-session loses nothing it had relayed; the file is fsynced at most every
`fsync_interval` seconds while records arrive, and when the session ends, so a machine crash loses
at most that interval."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = struct.Struct("!QdBBI")
HASH_SIZE = 32
_RECORD_OVERHEAD = HEADER.size + HASH_SIZE

# Directions.
FROM_CLIENT = 0  # client → gateway (relayed to the backend)
FROM_SERVER = 1  # backend → gateway (relayed to the client)
FROM_GATEWAY = 2  # what the gateway itself answered the client
META = 3  # session facts, not wire bytes

# Kinds.
WIRE = 1  # protocol bytes as relayed
EVENT = 2  # a JSON document (session start/end, decisions)
WIRE_REDACTED = 3  # protocol bytes with secrets replaced (the relayed bytes differed)
# The original bytes of the immediately preceding WIRE record of the same direction, before
# masking, sealed under the break-glass key (format and reader: data_plane.core.sealed).
WIRE_SEALED = 4

DIRECTION_NAMES = {FROM_CLIENT: "client", FROM_SERVER: "server", FROM_GATEWAY: "gateway", META: "meta"}


def genesis(session_id: str) -> bytes:
    return hashlib.sha256(b"proctor-recording:" + session_id.encode()).digest()


@dataclass(frozen=True)
class Record:
    seq: int
    time: float
    direction: int
    kind: int
    payload: bytes
    hash: bytes

    def json(self) -> Any:
        return json.loads(self.payload) if self.kind == EVENT else None


_pack_header = HEADER.pack
_sha256 = hashlib.sha256
_writev = os.writev
_now = time.time


def _append_py(fd: int, prev: bytes, seq: int, now: float, direction: int, kind: int,
               payload: bytes | bytearray | memoryview) -> bytes:
    """Write one record with one writev; returns its hash. The C twin (`_recording.append`) is
    what runs when it was compiled: the same bytes, the same hash."""
    header = _pack_header(seq, now, direction, kind, len(payload))
    digest = _sha256(prev)
    digest.update(header)
    digest.update(payload)
    link = digest.digest()
    written = _writev(fd, (header, payload, link))
    if written != HEADER.size + len(payload) + HASH_SIZE:  # a short write on a regular file: disk full
        raise OSError(f"short write ({written} of {HEADER.size + len(payload) + HASH_SIZE} bytes)")
    return link


def _verified_prefix_py(data: bytes | memoryview, prev: bytes) -> tuple[int, bytes]:
    """The longest run of whole records at the start of `data` whose links verify from `prev`,
    and the last link: (end, last hash). The C twin is `_recording.verified_prefix`."""
    pos, n = 0, len(data)
    while pos + _RECORD_OVERHEAD <= n:
        end = pos + HEADER.size + HEADER.unpack_from(data, pos)[4]
        if end + HASH_SIZE > n:
            break
        link = bytes(data[end:end + HASH_SIZE])
        if _sha256(prev + bytes(data[pos:end])).digest() != link:
            break
        prev, pos = link, end + HASH_SIZE
    return pos, prev


try:
    from data_plane.core import _recording
except ImportError:  # no compiler where this was installed: the fallback is correct, only slower
    _recording = None

ACCELERATED = _recording is not None
_append: Callable[[int, bytes, int, float, int, int, bytes | bytearray | memoryview], bytes] = (
    _recording.append if _recording is not None else _append_py)
verified_prefix: Callable[[bytes | memoryview, bytes], tuple[int, bytes]] = (
    _recording.verified_prefix if _recording is not None else _verified_prefix_py)


class RecordingWriter:
    __slots__ = ("_fd", "_fsync_interval", "_next_sync", "_prev", "_seq", "bytes_written", "path")

    def __init__(self, path: Path | str, session_id: str, *, fsync_interval: float = 1.0) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._prev = genesis(session_id)
        self._seq = 0
        self._fsync_interval = fsync_interval
        self._next_sync = _now() + fsync_interval
        self.bytes_written = 0

    @property
    def last_hash(self) -> str:
        return self._prev.hex()

    # The chain's state, for the C data path that appends while it relays (and hands it back).
    @property
    def fd(self) -> int:
        return self._fd

    @property
    def prev_hash(self) -> bytes:
        return self._prev

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def next_sync(self) -> float:
        return self._next_sync

    @property
    def fsync_interval(self) -> float:
        return self._fsync_interval

    def resume_from(self, prev_hash: bytes, seq: int, bytes_written: int, next_sync: float) -> None:
        self._prev, self._seq, self.bytes_written, self._next_sync = prev_hash, seq, bytes_written, next_sync

    def append(self, direction: int, kind: int, payload: bytes | bytearray | memoryview) -> None:
        now = _now()
        self._prev = _append(self._fd, self._prev, self._seq, now, direction, kind, payload)
        self._seq += 1
        self.bytes_written += _RECORD_OVERHEAD + len(payload)
        if now >= self._next_sync:
            os.fsync(self._fd)
            self._next_sync = now + self._fsync_interval

    def event(self, doc: dict[str, Any]) -> None:
        self.append(META, EVENT, json.dumps(doc, sort_keys=True, default=str).encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


def _complete_prefix_py(data: bytes | memoryview) -> int:
    """Length of the longest run of whole records at the start of `data`; a header with a zero time
    is where a mapped spool's unwritten zeros begin, and ends it. The C twin is `_recording.complete_prefix`."""
    pos, n = 0, len(data)
    while pos + HEADER.size <= n:
        _, ts, _, _, length = HEADER.unpack_from(data, pos)
        if ts == 0:
            break
        end = pos + HEADER.size + length + HASH_SIZE
        if end > n:
            break
        pos = end
    return pos


complete_prefix: Callable[[bytes | memoryview], int] = (
    _recording.complete_prefix if _recording is not None else _complete_prefix_py)


def first_record_size(data: bytes | memoryview) -> int:
    """Size of the record at the start of `data` (which must hold at least its header)."""
    return HEADER.size + HEADER.unpack_from(data, 0)[4] + HASH_SIZE


class ChainBroken(Exception):
    pass


def read_records(data: bytes, previous_hash: bytes) -> Iterator[Record]:
    """Decode and verify records; `previous_hash` is the genesis or the last hash of the prior chunk."""
    pos, n, prev = 0, len(data), previous_hash
    expected_seq: int | None = None
    while pos < n:
        if pos + HEADER.size > n:
            raise ChainBroken("truncated record header")
        seq, ts, direction, kind, length = HEADER.unpack_from(data, pos)
        start = pos + HEADER.size
        end = start + length
        if end + HASH_SIZE > n:
            raise ChainBroken(f"record {seq} truncated")
        digest = hashlib.sha256(prev)
        digest.update(data[pos:start])
        digest.update(data[start:end])
        stored = data[end:end + HASH_SIZE]
        if digest.digest() != stored:
            raise ChainBroken(f"hash chain broken at record {seq}")
        if expected_seq is not None and seq != expected_seq:
            raise ChainBroken(f"record {seq} out of order (expected {expected_seq})")
        expected_seq = seq + 1
        prev = stored
        yield Record(seq, ts, direction, kind, bytes(data[start:end]), stored)
        pos = end + HASH_SIZE
