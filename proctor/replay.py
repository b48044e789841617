"""Reading a session back: its recording chunks from S3, the hash chain verified across them,
and a PostgreSQL timeline (statements, results, errors, timing) for `proctor evidence replay`."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from control_plane.contract import recording_chunk_key
from data_plane.core.recording import (
    EVENT,
    FROM_CLIENT,
    FROM_GATEWAY,
    FROM_SERVER,
    META,
    WIRE_SEALED,
    ChainBroken,
    Record,
    genesis,
    read_records,
)
from data_plane.postgres import messages as m

SHOWN_ROWS = 5


class ReplayError(Exception):
    pass


def session_date(session_id: str) -> str:
    """Session ids start with their UTC start time (sYYYYMMDDhhmmss…)."""
    if len(session_id) < 9 or not session_id[1:9].isdigit():
        raise ReplayError(f"not a session id: {session_id!r}")
    return f"{session_id[1:5]}-{session_id[5:7]}-{session_id[7:9]}"


@dataclass(frozen=True)
class Recording:
    session_id: str
    records: list[Record]
    chunks: int

    @property
    def last_hash(self) -> str:
        return self.records[-1].hash.hex() if self.records else genesis(self.session_id).hex()


def load_recording(s3: Any, bucket: str, session_id: str) -> Recording:
    prefix = f"recordings/dt={session_date(session_id)}/{session_id}/"
    keys = sorted(obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                  for obj in page.get("Contents", []))
    if not keys:
        raise ReplayError(f"no recording for session {session_id} (not shipped yet, or unknown)")
    previous = genesis(session_id)
    records: list[Record] = []
    for index, key in enumerate(keys):
        expected = recording_chunk_key(session_date(session_id), session_id, index)
        if key != expected:
            raise ReplayError(f"recording chunk missing: expected {expected}, found {key}")
        data = gzip.decompress(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        try:
            chunk = list(read_records(data, previous))
        except ChainBroken as exc:
            raise ReplayError(f"recording of {session_id} fails verification in chunk {index}: {exc}") from exc
        if records and chunk and chunk[0].seq != records[-1].seq + 1:
            raise ReplayError(f"records missing between chunks {index - 1} and {index}")
        records += chunk
        if chunk:
            previous = chunk[-1].hash
    return Recording(session_id, records, len(keys))


def _value(value: bytes | None) -> str:
    if value is None:
        return "NULL"
    text = value.decode("utf-8", errors="replace")
    return text if text.isprintable() else "\\x" + value.hex()


def postgres_timeline(recording: Recording) -> Iterator[str]:
    """One line per meaningful protocol event, with the offset from the session's first record."""
    if not recording.records:
        return
    start = recording.records[0].time
    pending_rows: list[list[bytes | None]] = []
    row_count = 0
    columns: list[str] = []

    def flush_rows(offset: str) -> Iterator[str]:
        nonlocal pending_rows, row_count
        if row_count:
            yield f"{offset}  ←  {row_count} row(s)" + (f" [{', '.join(columns)}]" if columns else "")
            for row in pending_rows:
                yield f"{'':>10}       | " + " | ".join(_value(v) for v in row)
            if row_count > len(pending_rows):
                yield f"{'':>10}       | …"
        pending_rows, row_count = [], 0

    for record in recording.records:
        offset = f"+{record.time - start:8.3f}s"
        if record.direction == META and record.kind == EVENT:
            yield f"{offset}  ●  {_meta_line(record)}"
            continue
        if record.kind == WIRE_SEALED:  # ciphertext, not wire bytes: only `evidence reprocess` opens it
            continue
        frames = m.iter_frames(record.payload)
        for msg_type, body in frames:
            if record.direction == FROM_CLIENT:
                line = _client_line(msg_type, body)
            elif record.direction in (FROM_SERVER, FROM_GATEWAY):
                if msg_type == b"D":
                    row_count += 1
                    if len(pending_rows) < SHOWN_ROWS:
                        pending_rows.append(m.parse_data_row(body))
                    continue
                if msg_type == b"T":
                    columns = [f.name for f in m.parse_row_description(body)]
                    continue
                yield from flush_rows(offset)
                line = _server_line(msg_type, body, gateway=record.direction == FROM_GATEWAY)
            else:
                line = None
            if line:
                yield f"{offset}  {line}"
    yield from flush_rows(f"+{recording.records[-1].time - start:8.3f}s")


def _meta_line(record: Record) -> str:
    text = record.payload.decode(errors="replace")
    if '"sealing_key"' in text:  # the encrypted data key is noise in a timeline
        doc = record.json()
        return f"unmasked originals sealed under data key {doc['sealing_key']} of {doc['kms_key_id']}"
    if text.startswith('{"lineage"'):
        columns = record.json()["lineage"]
        return "result columns: " + ", ".join(
            f"{c['name']} ← {', '.join(c['sources'])}" if c.get("sources") else f"{c['name']} (no lineage)"
            for c in columns)
    return text


def _client_line(msg_type: bytes, body: bytes) -> str | None:
    if msg_type == b"Q":
        return "→  query: " + m.parse_query(body)
    if msg_type == b"P":
        parsed = m.parse_parse(body)
        return f"→  parse {parsed.statement or '(unnamed)'}: {parsed.query}"
    if msg_type == b"B":
        bind = m.parse_bind(body)
        return f"→  bind {bind.portal or '(unnamed)'} ({len(bind.params)} parameter(s))"
    if msg_type == b"E":
        return None
    if msg_type == b"p":
        return "→  password: " + m.parse_password(body)
    if msg_type == b"X":
        return "→  terminate"
    return None


def _server_line(msg_type: bytes, body: bytes, *, gateway: bool) -> str | None:
    who = "gateway" if gateway else ""
    if msg_type == b"C":
        return "←  " + m.parse_command_complete(body)
    if msg_type in (b"E", b"N"):
        fields = m.error_fields(body)
        kind = "error" if msg_type == b"E" else "notice"
        return f"←  {who + ' ' if who else ''}{kind} {fields.get('S', '')} {fields.get('C', '')}: {fields.get('M', '')}"
    if msg_type == b"R" and m.parse_authentication(body)[0] == m.AUTH_OK:
        return "←  authenticated"
    if msg_type == b"H":
        return "←  copy out"
    if msg_type == b"G":
        return "←  copy in"
    return None


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
