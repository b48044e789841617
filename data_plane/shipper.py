"""Moves evidence from the spool to S3: recording chunks to the recordings bucket, audit events
and the per-session index row to the evidence bucket, every object with a SHA-256 checksum under
the buckets' Object Lock retention. Runs as its own low-priority process beside the gateway (so
compression never competes with the relay for the interpreter), and ships whatever a previous
gateway left behind when it starts.

Progress is written only after S3 accepted an object, and object keys are a function of the
spool offset, so a retry after a crash rewrites the same keys: delivery is at least once."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from control_plane.contract import (
    CLASS_DATASTORE_ACTIVITY,
    DAY_MS,
    SESSION_COLUMNS,
    STATUS_FAILURE,
    EventBatch,
    EventTemplate,
    c_row_key,
    c_row_parts,
    encode_jsonl_gz,
    evidence_event,
    full_row_key,
    gzip_member,
    put_evidence_object,
    recording_chunk_key,
    session_event_id,
    session_index_key,
)
from data_plane.core.recording import (
    HEADER,
    _recording,
    complete_prefix,
    first_record_size,
    genesis,
    verified_prefix,
)
from data_plane.core.spool import read_json, write_json_atomic

log = logging.getLogger("proctor.shipper")

CHUNK_BYTES = 8 << 20
MAX_READ = 64 << 20
# A live session's recording waits for a full chunk or this long (its events ship every round): each
# object costs a PUT, and a busy gateway's sessions would otherwise each cost one a round.
RECORDING_DELAY = 10.0


def _dt(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds") if ts else None


def _full_row_runs_py(lines: bytes, rests: Mapping[int, bytes] | None = None,
                      ) -> tuple[list[tuple[int, bytes, bytes, int]], list[bytes]]:
    """The twin of `_recording.full_row_runs`: the full rows among `lines`, and the C rows whose template
    version `rests` has members for (completed with them: `c_row_parts`), grouped by day and region (at
    most 8 groups), as (earliest time, region, their lines, count), and the other lines."""
    runs: dict[tuple[int, bytes], list[Any]] = {}
    others: list[bytes] = []
    tails: dict[int, tuple[bytes, bytes] | None] = {}
    for line in lines.splitlines():
        c_key = c_row_key(line) if rests else None
        tail = None if c_key is None else tails.setdefault(c_key[1], _tail(rests, c_key[1]))
        if c_key is not None and tail is not None:
            key: tuple[int, bytes] | None = (c_key[0], tail[1])
            line = line[:c_key[2]] + tail[0] + b"}"
        else:
            key = full_row_key(line)
        group = None if key is None else (key[0] // DAY_MS, key[1])
        if key is None or (group not in runs and len(runs) == 8):
            others.append(line)
            continue
        run = runs.setdefault(group, [key[0], key[1], [], 0])
        run[0] = min(run[0], key[0])
        run[2].append(line + b"\n")
        run[3] += 1
    return [(first, region, b"".join(found), count) for first, region, found, count in runs.values()], others


def _tail(rests: Mapping[int, bytes] | None, version: int) -> tuple[bytes, bytes] | None:
    """Template `version`'s members and the plain region among them, or None (as full_row_key reads it)."""
    rest = None if rests is None else rests.get(version)
    key = None if rest is None else full_row_key(b'{"time":0' + rest + b"}")
    return None if key is None else (rest, key[1])


full_row_runs = _recording.full_row_runs if _recording is not None else _full_row_runs_py
# Rows are completed and compressed a slice of lines at a time: a round's rows of a busy session, whole,
# would come back from full_row_runs as one buffer three times their size (the template's members are
# spliced into each), copied again on its way to the compressor, and a buffer that size is out of the
# caches by the time it is compressed. A slice's stays in them: half the CPU per row.
ROWS_SLICE_BYTES = 256 << 10


def line_slices(data: bytes, size: int | None = None) -> list[bytes]:
    """`data` (whole lines) cut after a newline every `size` (ROWS_SLICE_BYTES) bytes or so; a longer
    line goes alone."""
    size = size or ROWS_SLICE_BYTES
    pieces, pos, n = [], 0, len(data)
    while pos < n:
        cut = n if n - pos <= size else data.rfind(b"\n", pos, pos + size) + 1
        if cut <= pos:
            cut = data.find(b"\n", pos + size)
            cut = n if cut < 0 else cut + 1
        pieces.append(data[pos:cut])
        pos = cut
    return pieces


def _trim_unwritten(directory: Path, progress: dict[str, Any]) -> None:
    """A dead gateway's spool files may end in the zeros its C data path had allocated and not
    written yet (_spoolmap.h), and the events in a line it did not finish: cut both off, so that what
    follows (the orphan's disconnect row) is appended after whole rows. A partial record before the
    zeros is left as it is, to be counted as torn."""
    for name, key in (("recording.bin", "recording_offset"), ("events.jsonl", "events_offset")):
        path = directory / name
        try:
            with open(path, "r+b") as fh:
                offset = int(progress[key])
                fh.seek(offset)
                rest = fh.read()
                if name == "recording.bin":
                    end = complete_prefix(rest)
                    if end < len(rest) and not rest[end:].strip(b"\0"):
                        fh.truncate(offset + end)
                    continue
                unwritten = rest.find(b"\0")
                written = rest if unwritten < 0 else rest[:unwritten]
                end = written.rfind(b"\n") + 1
                if end < len(written):
                    log.error("session %s: dropping the torn last event line a dead gateway left (%d bytes)",
                              directory.name, len(written) - end)
                if end < len(rest):
                    fh.truncate(offset + end)
        except FileNotFoundError:
            continue


def _save_progress(directory: Path, progress: dict[str, Any]) -> None:
    """Replaced whole but not fsynced: a progress write lost to a machine crash only means shipping the
    same objects to the same keys again (at least once), and the spool rarely outlives its machine."""
    write_json_atomic(directory / "shipped.json", progress, fsync="never")


class Shipper:
    def __init__(self, s3: Any, spool_root: Path, *, recordings_bucket: str, evidence_bucket: str, region: str,
                 chunk_bytes: int = CHUNK_BYTES, recording_delay: float = RECORDING_DELAY) -> None:
        self.s3 = s3
        self.root = spool_root
        self.recordings_bucket = recordings_bucket
        self.evidence_bucket = evidence_bucket
        self.region = region
        self.chunk_bytes = chunk_bytes
        self.recording_delay = recording_delay

    def current_instance(self) -> str | None:
        doc = read_json(self.root / "instance")
        return doc.get("instance_id") if doc else None

    def ship_once(self, *, flush: bool = False) -> int:
        """Ship what is ready; `flush` ships everything spooled. Returns objects written.

        Events of every session go out together, one object per partition and round, so a busy
        gateway costs a few PUTs a round rather than one per session; rows are compressed as they
        are read, so a round holds compressed bytes rather than every row it ships."""
        sessions = self.root / "sessions"
        if not sessions.exists():
            return 0
        instance = self.current_instance()
        written = 0
        events = EventBatch()
        batch: list[tuple[Path, dict[str, Any], int, int]] = []  # (directory, progress, bytes read, rows)
        states: list[tuple[Path, dict[str, Any], dict[str, Any], bool]] = []
        for directory in sorted(sessions.iterdir()):
            try:
                state = self._open_session(directory, instance)
                if state is None:
                    continue
                meta, progress, closed = state
                waited = time.time() - float(progress.get("recording_shipped_at", progress["shipped_at"]))
                due = closed or flush or waited >= self.recording_delay
                written += self._ship_recording(directory, meta, progress, due, closed)
                end, count = self._read_events(directory, meta["session_id"], progress, events)
                if count or end:
                    batch.append((directory, progress, end, count))
                states.append((directory, meta, progress, closed))
            except Exception:
                log.exception("shipping %s failed; will retry", directory.name)
        if events.rows:
            # Named by where each session's slice starts: a retry after a lost progress write lands on
            # the same keys instead of adding copies.
            starts = "|".join(f"{d.name}:{p['events_offset']}" for d, p, _, count in batch if count)
            assert events.first_time is not None
            first = datetime.fromtimestamp(events.first_time / 1000, UTC)
            batch_id = f"{first:%Y%m%dT%H%M%S%f}Z-" + hashlib.blake2b(starts.encode(), digest_size=6).hexdigest()
            events.write(self.s3, self.evidence_bucket, batch_id)
            written += len(events.partitions)
        for directory, progress, end, _ in batch:
            progress.update(events_offset=int(progress["events_offset"]) + end, shipped_at=time.time())
            _save_progress(directory, progress)
        for directory, meta, progress, closed in states:
            if not closed:
                continue
            try:
                self._note_torn_tails(directory, progress)
                if self._fully_shipped(directory, progress):
                    self._ship_index(directory, meta, progress)
                    shutil.rmtree(directory, ignore_errors=True)
                    written += 1
            except Exception:
                log.exception("finishing %s failed; will retry", directory.name)
        return written

    def _open_session(self, directory: Path, instance: str | None,
                      ) -> tuple[dict[str, Any], dict[str, Any], bool] | None:
        meta = read_json(directory / "meta.json")
        if meta is None:
            return None
        now = time.time()
        progress = read_json(directory / "shipped.json") or {
            "recording_offset": 0, "chunk": 0, "events_offset": 0, "prev_hash": genesis(meta["session_id"]).hex(),
            "shipped_at": now, "recording_shipped_at": now}
        closed = (directory / "closed").exists()
        if not closed and meta.get("instance_id") != instance:
            _trim_unwritten(directory, progress)
            self._close_orphan(directory, meta)
            closed = True
        return meta, progress, closed

    def _ship_recording(self, directory: Path, meta: dict[str, Any], progress: dict[str, Any], due: bool,
                        closed: bool) -> int:
        """Chunks of the recording from the shipped offset: full ones, and the rest too when `due`. Each byte
        is read and verified once: the chunks are cut from one read of up to MAX_READ bytes."""
        path = directory / "recording.bin"
        written = 0
        while True:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return written
            pending = size - int(progress["recording_offset"])
            if pending <= 0 or (not due and pending < self.chunk_bytes):
                return written
            with open(path, "rb") as fh:
                fh.seek(int(progress["recording_offset"]))
                data = fh.read(min(pending, MAX_READ))
                if len(data) >= HEADER.size and (first := first_record_size(data)) > len(data):
                    # One record larger than a read (a masked message up to max_message_bytes): read all of it.
                    data += fh.read(min(pending, first) - len(data))
            # A live session's file may be written in place (the C data path maps it), so a record is
            # taken only once its link verifies: a partly visible one never ships.
            end = complete_prefix(data) if closed else verified_prefix(data, bytes.fromhex(progress["prev_hash"]))[0]
            view = memoryview(data)[:end]
            while view and (due or len(view) >= self.chunk_bytes):
                # Whole records up to the target size; a single larger record goes alone.
                cut = len(view)
                if cut > self.chunk_bytes:
                    cut = complete_prefix(view[: self.chunk_bytes]) or first_record_size(view)
                self._put_chunk(directory, meta, progress, view[:cut])
                view = view[cut:]
                written += 1
            if end == 0 or view:  # nothing whole yet, or the rest waits for a full chunk
                return written

    def _put_chunk(self, directory: Path, meta: dict[str, Any], progress: dict[str, Any], chunk: memoryview) -> None:
        key = recording_chunk_key(_dt(float(meta["started_at"])), meta["session_id"], int(progress["chunk"]))
        # Level 1: on a busy gateway the shipper shares the cores with the relay; size matters less.
        body = gzip_member(chunk)
        last_hash = chunk[-32:].hex()
        self.s3.put_object(Bucket=self.recordings_bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256",
                           ContentType="application/vnd.proctor.recording", ContentEncoding="gzip",
                           Metadata={"session-id": meta["session_id"], "first-prev-hash": progress["prev_hash"],
                                     "last-hash": last_hash})
        now = time.time()
        progress.update(recording_offset=int(progress["recording_offset"]) + len(chunk),
                        chunk=int(progress["chunk"]) + 1, prev_hash=last_hash, shipped_at=now, recording_shipped_at=now)
        _save_progress(directory, progress)

    def _read_events(self, directory: Path, session_id: str, progress: dict[str, Any],
                     events: EventBatch) -> tuple[int, int]:
        """Adds the complete event lines not shipped yet to `events`, expanded; returns (bytes
        consumed, rows added). Nothing is added if any of them cannot be (a missing template)."""
        path = directory / "events.jsonl"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0, 0
        offset = int(progress["events_offset"])
        if size <= offset:
            return 0, 0
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size - offset)
        unwritten = data.find(b"\0")  # a mapped file's zeros not written yet (no event line holds a NUL)
        if unwritten >= 0:
            data = data[:unwritten]
        end = data.rfind(b"\n") + 1
        if end == 0:
            return 0, 0
        templates = self._templates(directory)
        rests = {version: c_row_parts(template)[0] for version, template in templates.items()}
        rows: list[tuple[EventTemplate | None, dict[str, Any]]] = []  # compact rows (small) and their template
        # The C data path's rows, completed with their template's members (or whole, from older gateways).
        runs: list[tuple[int, bytes, bytes, int]] = []
        others: list[bytes] = []
        for piece in line_slices(data[:end]):
            piece_runs, piece_others = full_row_runs(piece, rests)
            runs += piece_runs
            others += piece_others
        for line in others:
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                # A line torn by a crash cannot be shipped; keep its bytes out of the way of the rest.
                log.error("skipping an unreadable event line in %s (%d bytes)", session_id, len(line))
                continue
            template = None
            if "class_uid" not in row:  # a compact row: expanded with the session's template below
                version = int(row.pop("tv"))
                template = templates.get(version)
                if template is None:  # written before any row of it: the files were read after the rows
                    raise FileNotFoundError(f"{session_id}: event template {version} missing")
            rows.append((template, row))
        added = 0
        for first_time, region, lines, count in runs:
            events.add_run(first_time, region.decode(), lines, count)
            added += count
        for template, row in rows:  # each full row lives only until it is compressed
            if template is None:
                events.add(row)
            else:
                events.add(*template.expand_line(row, session_event_id(session_id, int(row["seq"]))))
        return end, added + len(rows)

    @staticmethod
    def _templates(directory: Path) -> dict[int, EventTemplate]:
        """The session's event templates by version (template-<version>.json)."""
        templates = {}
        for path in directory.glob("template-*.json"):
            version = path.stem.removeprefix("template-")
            doc = read_json(path) if version.isdigit() else None
            if doc is not None:
                templates[int(version)] = EventTemplate.from_doc(doc)
        return templates

    def _note_torn_tails(self, directory: Path, progress: dict[str, Any]) -> None:
        """A closed session's files may end in a partial record or line (disk full, machine crash):
        nothing more will complete them, so they are counted as torn rather than waited for."""
        torn = {}
        recording = directory / "recording.bin"
        if recording.exists():
            with open(recording, "rb") as fh:
                fh.seek(int(progress["recording_offset"]))
                rest = fh.read()
            if rest and complete_prefix(rest) == 0:
                torn["recording_torn_bytes"] = len(rest)
        events = directory / "events.jsonl"
        if events.exists():
            rest = events.read_bytes()[int(progress["events_offset"]):]
            if rest and b"\n" not in rest:
                torn["events_torn_bytes"] = len(rest)
        if torn and any(progress.get(k) != v for k, v in torn.items()):
            log.error("session %s ends with torn evidence: %s", directory.name, torn)
            progress.update(torn)
            _save_progress(directory, progress)

    def _fully_shipped(self, directory: Path, progress: dict[str, Any]) -> bool:
        for name, key, torn in (("recording.bin", "recording_offset", "recording_torn_bytes"),
                                ("events.jsonl", "events_offset", "events_torn_bytes")):
            path = directory / name
            if path.exists() and path.stat().st_size > int(progress[key]) + int(progress.get(torn, 0)):
                return False
        return True

    def _close_orphan(self, directory: Path, meta: dict[str, Any]) -> None:
        """The gateway that owned this session is gone: say so in the evidence, then close it."""
        row = evidence_event(CLASS_DATASTORE_ACTIVITY, "disconnect", status=STATUS_FAILURE,
                             region=meta.get("region", self.region),
                             status_detail="gateway terminated before the session ended",
                             session_id=meta["session_id"], src_ip=meta.get("client_ip"))
        with open(directory / "events.jsonl", "ab") as fh:  # after whole rows: see _trim_unwritten
            fh.write((json.dumps(row, sort_keys=True) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
        if not (directory / "summary.json").exists():
            write_json_atomic(directory / "summary.json", {"session_id": meta["session_id"], "ended_at": time.time(),
                                                           "interrupted": True})
        (directory / "closed").touch()

    def _ship_index(self, directory: Path, meta: dict[str, Any], progress: dict[str, Any]) -> None:
        summary = read_json(directory / "summary.json") or {}
        started = float(meta["started_at"])
        row: dict[str, Any] = dict.fromkeys(name for name, _ in SESSION_COLUMNS)
        row.update({k: v for k, v in summary.items() if k in row})
        row.update(
            session_id=meta["session_id"], protocol=meta.get("protocol"), started_at=_iso(started),
            ended_at=_iso(summary.get("ended_at")), chunks=int(progress["chunk"]), last_hash=progress["prev_hash"],
            recording_prefix=f"s3://{self.recordings_bucket}/recordings/dt={_dt(started)}/{meta['session_id']}/",
            gateway_region=meta.get("region", self.region), src_ip=summary.get("src_ip") or meta.get("client_ip"),
        )
        key = session_index_key(_dt(started), meta.get("region", self.region), meta["session_id"])
        put_evidence_object(self.s3, self.evidence_bucket, key, encode_jsonl_gz([row]))


def main(argv: list[str] | None = None) -> None:
    import boto3

    parser = argparse.ArgumentParser(prog="data_plane.shipper")
    parser.add_argument("--spool", required=True)
    parser.add_argument("--recordings-bucket", required=True)
    parser.add_argument("--evidence-bucket", required=True)
    parser.add_argument("--region", required=True, help="the gateway's region (the events' partition)")
    parser.add_argument("--s3-region", help="the buckets' region (default: --region)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between rounds (events ship every round)")
    parser.add_argument("--recording-delay", type=float, default=RECORDING_DELAY,
                        help="the longest a live session's recording waits for a full chunk")
    parser.add_argument("--nice", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s shipper %(levelname)s %(message)s")
    if args.nice:
        os.nice(args.nice)
    shipper = Shipper(boto3.client("s3", region_name=args.s3_region or args.region), Path(args.spool),
                      recordings_bucket=args.recordings_bucket, evidence_bucket=args.evidence_bucket,
                      region=args.region, recording_delay=args.recording_delay)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    backoff = args.interval
    while not stop.is_set():
        try:
            shipper.ship_once()
            backoff = args.interval
        except Exception:
            log.exception("shipping round failed")
            backoff = min(backoff * 2, 60)
        stop.wait(backoff)
    # Final flush on the way out (the gateway has closed its sessions by now).
    shipper.ship_once(flush=True)


if __name__ == "__main__":
    main()
