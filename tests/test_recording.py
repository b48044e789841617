"""Session recordings: what the writer appends reads back verified from the genesis hash, and any
change, drop, reorder or truncation of the bytes is detected."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from data_plane.core import recording as rec
from data_plane.core.recording import ChainBroken, RecordingWriter, genesis, read_records

SESSION = "s20250101000000abcdef012345"
RECORDS: list[tuple[int, int, bytes]] = [
    (rec.FROM_SERVER, rec.WIRE, b"R\x00\x00\x00\x08\x00\x00\x00\x00Z\x00\x00\x00\x05I"),
    (rec.FROM_CLIENT, rec.WIRE, b"Q\x00\x00\x00\rSELECT 1\x00"),
    (rec.FROM_SERVER, rec.WIRE, b""),
    (rec.FROM_CLIENT, rec.WIRE_REDACTED, b"Q\x00\x00\x00\x20ALTER ROLE a PASSWORD '[REDACTED]'\x00"),
    (rec.FROM_GATEWAY, rec.WIRE, b"E" + bytes(range(256)) * 4),
]


def write_recording(path: Path, records: list[tuple[int, int, bytes]] = RECORDS, *,
                    event: dict | None = None) -> RecordingWriter:
    writer = RecordingWriter(path, SESSION, fsync_interval=3600)
    if event is not None:
        writer.event(event)
    for direction, kind, payload in records:
        writer.append(direction, kind, payload)
    writer.close()
    return writer


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each whole record in `data`."""
    spans, pos = [], 0
    while pos < len(data):
        end = pos + rec.HEADER.size + rec.HEADER.unpack_from(data, pos)[4] + rec.HASH_SIZE
        spans.append((pos, end))
        pos = end
    return spans


@pytest.fixture
def recording(tmp_path: Path) -> tuple[bytes, RecordingWriter]:
    writer = write_recording(tmp_path / "recording.bin", event={"activity": "connect", "user": "alice"})
    return (tmp_path / "recording.bin").read_bytes(), writer


def test_genesis_is_bound_to_the_session_id() -> None:
    assert genesis(SESSION) == hashlib.sha256(b"proctor-recording:" + SESSION.encode()).digest()
    assert genesis(SESSION) != genesis(SESSION + "x")


def test_records_read_back_with_seq_direction_kind_and_payload(recording: tuple[bytes, RecordingWriter]) -> None:
    data, _ = recording
    records = list(read_records(data, genesis(SESSION)))
    assert [r.seq for r in records] == list(range(len(RECORDS) + 1))
    event, *wire = records
    assert (event.direction, event.kind) == (rec.META, rec.EVENT)
    assert event.json() == {"activity": "connect", "user": "alice"}
    assert [(r.direction, r.kind, r.payload) for r in wire] == RECORDS
    assert all(r.json() is None for r in wire)
    assert all(abs(r.time - time.time()) < 60 for r in records)


def test_each_hash_chains_the_previous_hash_header_and_payload(recording: tuple[bytes, RecordingWriter]) -> None:
    data, writer = recording
    prev = genesis(SESSION)
    for (start, end), record in zip(record_spans(data), read_records(data, prev), strict=True):
        header = data[start:start + rec.HEADER.size]
        assert record.hash == hashlib.sha256(prev + header + record.payload).digest()
        assert data[end - rec.HASH_SIZE:end] == record.hash
        prev = record.hash
    assert writer.last_hash == prev.hex()


def test_writer_counts_bytes_and_creates_a_private_file(tmp_path: Path) -> None:
    writer = write_recording(tmp_path / "r.bin")
    assert writer.bytes_written == (tmp_path / "r.bin").stat().st_size
    assert stat.S_IMODE((tmp_path / "r.bin").stat().st_mode) == 0o600


def test_event_payload_is_sorted_json(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path / "r.bin", SESSION)
    writer.event({"b": 1, "a": time})  # not JSON: written with str()
    writer.close()
    [record] = read_records((tmp_path / "r.bin").read_bytes(), genesis(SESSION))
    assert record.payload.startswith(b'{"a": ')
    assert json.loads(record.payload)["b"] == 1


def test_close_twice_is_harmless(tmp_path: Path) -> None:
    writer = write_recording(tmp_path / "r.bin")
    writer.close()


def test_wrong_genesis_is_detected(recording: tuple[bytes, RecordingWriter]) -> None:
    data, _ = recording
    with pytest.raises(ChainBroken, match="record 0"):
        list(read_records(data, genesis("another-session")))


@pytest.mark.parametrize("where", ["payload", "header_time", "header_direction", "hash"])
def test_tampering_with_one_byte_breaks_the_chain(recording: tuple[bytes, RecordingWriter], where: str) -> None:
    data, _ = recording
    start, end = record_spans(data)[2]
    offset = {"payload": start + rec.HEADER.size + 3, "header_time": start + 9, "header_direction": start + 16,
              "hash": end - 1}[where]
    tampered = bytearray(data)
    tampered[offset] ^= 0x01
    with pytest.raises(ChainBroken):
        list(read_records(bytes(tampered), genesis(SESSION)))
    # Everything before the tampered record still verifies.
    assert len(list(read_records(data[:start], genesis(SESSION)))) == 2


def test_dropping_a_record_breaks_the_chain(recording: tuple[bytes, RecordingWriter]) -> None:
    data, _ = recording
    start, end = record_spans(data)[3]
    with pytest.raises(ChainBroken, match="record 4"):
        list(read_records(data[:start] + data[end:], genesis(SESSION)))


def test_dropping_the_first_record_breaks_the_chain(recording: tuple[bytes, RecordingWriter]) -> None:
    data, _ = recording
    _, end = record_spans(data)[0]
    with pytest.raises(ChainBroken):
        list(read_records(data[end:], genesis(SESSION)))


def test_reordering_two_records_breaks_the_chain(recording: tuple[bytes, RecordingWriter]) -> None:
    data, _ = recording
    (a0, a1), (b0, b1) = record_spans(data)[1:3]
    swapped = data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:]
    assert len(swapped) == len(data)
    with pytest.raises(ChainBroken):
        list(read_records(swapped, genesis(SESSION)))


COMPLETE_PREFIXES = pytest.mark.parametrize("complete_prefix", [rec._complete_prefix_py, rec.complete_prefix],
                                            ids=["python", "module"])


@COMPLETE_PREFIXES
def test_truncated_recording_is_detected_and_complete_prefix_keeps_whole_records(
        recording: tuple[bytes, RecordingWriter], complete_prefix: Callable[..., int]) -> None:
    data, _ = recording
    spans = record_spans(data)
    for cut in (spans[3][0] + 1, spans[3][0] + rec.HEADER.size + 2, spans[3][1] - 1):
        truncated = data[:cut]
        with pytest.raises(ChainBroken, match="truncated"):
            list(read_records(truncated, genesis(SESSION)))
        prefix = complete_prefix(truncated)
        assert prefix == spans[3][0]
        assert len(list(read_records(truncated[:prefix], genesis(SESSION)))) == 3


@COMPLETE_PREFIXES
def test_complete_prefix_of_whole_records_is_everything(recording: tuple[bytes, RecordingWriter],
                                                        complete_prefix: Callable[..., int]) -> None:
    data, _ = recording
    assert complete_prefix(data) == len(data)
    assert complete_prefix(memoryview(data)) == len(data)
    assert complete_prefix(b"") == 0
    assert complete_prefix(data[:rec.HEADER.size - 1]) == 0


def test_chain_continues_across_chunks_split_at_a_record_boundary(recording: tuple[bytes, RecordingWriter]) -> None:
    data, writer = recording
    boundary = record_spans(data)[2][1]
    first, second = data[:boundary], data[boundary:]
    head = list(read_records(first, genesis(SESSION)))
    tail = list(read_records(second, head[-1].hash))
    assert [r.seq for r in head + tail] == list(range(len(RECORDS) + 1))
    assert tail[-1].hash.hex() == writer.last_hash
    # The second chunk does not verify on its own, nor after the wrong predecessor.
    with pytest.raises(ChainBroken):
        list(read_records(second, genesis(SESSION)))
    with pytest.raises(ChainBroken):
        list(read_records(second, head[-2].hash))


def test_chunks_shipped_out_of_order_break_the_chain(recording: tuple[bytes, RecordingWriter]) -> None:
    data, _ = recording
    spans = record_spans(data)
    chunks = [data[s:e] for s, e in spans]
    with pytest.raises(ChainBroken):
        list(read_records(b"".join([chunks[0], chunks[2], chunks[1], *chunks[3:]]), genesis(SESSION)))


def test_reopening_a_recording_restarts_the_chain_and_is_detected(tmp_path: Path) -> None:
    # A second writer on the same file starts again at seq 0 from the genesis: not a valid continuation.
    path = tmp_path / "r.bin"
    write_recording(path, RECORDS[:2])
    write_recording(path, RECORDS[2:])
    with pytest.raises(ChainBroken):
        list(read_records(path.read_bytes(), genesis(SESSION)))


@pytest.mark.skipif(not rec.ACCELERATED, reason="the C accelerator was not compiled")
@pytest.mark.parametrize("sha_extensions", [False, True])  # the portable compression and, where present, SHA-NI
def test_the_c_append_writes_the_same_bytes_and_hash_as_the_python_one(tmp_path: Path,
                                                                        sha_extensions: bool) -> None:
    # Sizes around SHA-256's 64-byte blocks (the 22-byte header and 32-byte link shift them), and big ones.
    payloads: list[bytes | bytearray | memoryview] = [bytes(range(256))[:n] for n in (0, 1, 9, 10, 11, 55, 63, 64, 65,
                                                                                       73, 74, 75, 127, 128, 129)]
    payloads += [b"Q\x00\x00\x00\rSELECT 1\x00", bytes(range(256)) * 300, bytearray(b"x" * 55),
                 memoryview(b"y" * 64), os.urandom(1 << 18)]
    files = {name: tmp_path / name for name in ("c.bin", "py.bin")}
    fds = {name: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) for name, path in files.items()}
    assert rec._recording is not None
    rec._recording._set_sha_path(sha_extensions)
    try:
        prev = {name: genesis(SESSION) for name in files}
        for seq, payload in enumerate(payloads):
            now = time.time()
            prev["c.bin"] = rec._recording.append(fds["c.bin"], prev["c.bin"], seq, now, rec.FROM_SERVER, rec.WIRE,
                                                  payload)
            prev["py.bin"] = rec._append_py(fds["py.bin"], prev["py.bin"], seq, now, rec.FROM_SERVER, rec.WIRE,
                                            payload)
            assert prev["c.bin"] == prev["py.bin"]
    finally:
        rec._recording._set_sha_path(True)
        for fd in fds.values():
            os.close(fd)
    data = files["c.bin"].read_bytes()
    assert data == files["py.bin"].read_bytes()
    assert [r.payload for r in read_records(data, genesis(SESSION))] == [bytes(p) for p in payloads]


@pytest.mark.skipif(not rec.ACCELERATED, reason="the C accelerator was not compiled")
def test_the_c_append_reports_a_failed_write_as_oserror(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "r.bin", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        assert rec._recording is not None
        with pytest.raises(OSError):
            rec._recording.append(fd, genesis(SESSION), 0, time.time(), rec.FROM_CLIENT, rec.WIRE, b"x")
    finally:
        os.close(fd)


@pytest.mark.parametrize("verified_prefix", [rec._verified_prefix_py, rec.verified_prefix], ids=["python", "module"])
def test_the_verified_prefix_is_the_records_whose_links_verify(
        tmp_path: Path, verified_prefix: Callable[..., tuple[int, bytes]]) -> None:
    """What the shipper takes from a live, mapped spool file: whole records that verify, and not a
    partly written one, a changed one, or the zeros not written yet."""
    writer = rec.RecordingWriter(tmp_path / "r.bin", SESSION)
    ends = []
    for payload in (b"one", b"", bytes(range(256)) * 5, b"four"):
        writer.append(rec.FROM_CLIENT, rec.WIRE, payload)
        ends.append(writer.bytes_written)
    writer.close()
    data = (tmp_path / "r.bin").read_bytes()
    assert verified_prefix(data, genesis(SESSION)) == (len(data), data[-32:])
    assert verified_prefix(data + bytes(1 << 16), genesis(SESSION)) == (len(data), data[-32:])
    assert verified_prefix(data[:-1], genesis(SESSION)) == (ends[2], data[ends[2] - 32:ends[2]])
    changed = bytearray(data)
    changed[ends[1] + 30] ^= 1  # inside the third record's payload
    assert verified_prefix(bytes(changed), genesis(SESSION))[0] == ends[1]
    unfinished = data[:ends[2]] + bytes(22) + data[ends[2] + 22:]  # the last header not written yet
    assert verified_prefix(unfinished, genesis(SESSION))[0] == ends[2]
    assert verified_prefix(data, b"\x01" * 32)[0] == 0  # the wrong predecessor
    assert verified_prefix(memoryview(data)[ends[0]:], data[ends[0] - 32:ends[0]]) == (len(data) - ends[0],
                                                                                      data[-32:])


@COMPLETE_PREFIXES
def test_a_zero_header_ends_the_complete_prefix(tmp_path: Path, complete_prefix: Callable[..., int]) -> None:
    writer = rec.RecordingWriter(tmp_path / "r.bin", SESSION)
    writer.append(rec.FROM_CLIENT, rec.WIRE, b"SELECT 1")
    writer.append(rec.FROM_SERVER, rec.WIRE, b"")
    writer.close()
    data = (tmp_path / "r.bin").read_bytes()
    assert complete_prefix(data + bytes(4096)) == len(data)
    assert complete_prefix(memoryview(data + bytes(4096))[:-1]) == len(data)
    negative_zero = rec.HEADER.pack(2, -0.0, rec.FROM_CLIENT, rec.WIRE, 0) + bytes(rec.HASH_SIZE)
    assert complete_prefix(data + negative_zero) == len(data)
