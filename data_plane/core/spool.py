"""The local spool: evidence is on disk before it is relayed, and the shipper moves it to S3.

    <root>/instance                  the running gateway's instance id
    <root>/sessions/<id>/meta.json   who, what, when (written at session start)
    <root>/sessions/<id>/recording.bin   the hash-chained recording (see recording.py)
    <root>/sessions/<id>/events.jsonl    audit events, one JSON object per line
    <root>/sessions/<id>/summary.json    totals, written when the session ends
    <root>/sessions/<id>/closed          marker: nothing more will be written
    <root>/sessions/<id>/shipped.json    the shipper's progress

Written files are in the page cache before anything is relayed (a gateway crash loses nothing);
their fsyncs (what a machine crash needs) run on one background thread, in order, so a session's
start and end never wait for the disk on the event loop: the recording's own fsync policy is in
recording.py.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import orjson

from data_plane.core.recording import WIRE, RecordingWriter

log = logging.getLogger("proctor.gateway.spool")

# One thread, so the disk sees a session's fsyncs in the order they were asked for (its start before
# its end); joined at interpreter exit, so a draining gateway finishes them before it is gone.
_SYNCER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proctor-fsync")


def in_background(task: Callable[..., None], *args: Any) -> None:
    """Runs a spool's disk work on the fsync thread; a failure is logged (the data is in the page cache)."""
    def run() -> None:
        try:
            task(*args)
        except OSError:
            log.exception("spool disk work failed: %s", getattr(task, "__qualname__", task))
    _SYNCER.submit(run)


def wait_background() -> None:
    """Returns once the disk work asked for so far is done (a drain waits so before the last shipping)."""
    _SYNCER.submit(lambda: None).result()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: Mapping[str, Any], *, fsync: Literal["now", "background", "never"] = "now",
                      ) -> None:
    """Replace `path` whole, and fsync it before returning, on the background thread, or never (the
    kernel writes it back when it will)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, sort_keys=True, default=str)
        fh.flush()
        if fsync == "now":
            os.fsync(fh.fileno())
    tmp.replace(path)
    if fsync == "background":
        in_background(_fsync_path, str(path))


class Spool:
    def __init__(self, root: Path, *, fsync_interval: float = 1.0) -> None:
        self.root = root
        self.sessions_dir = root / "sessions"
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self.instance_id = uuid.uuid4().hex
        self.fsync_interval = fsync_interval
        write_json_atomic(root / "instance", {"instance_id": self.instance_id, "pid": os.getpid()})

    def open_session(self, session_id: str, meta: Mapping[str, Any]) -> SessionEvidence:
        directory = self.sessions_dir / session_id
        directory.mkdir(mode=0o700)
        write_json_atomic(directory / "meta.json", dict(meta, session_id=session_id, instance_id=self.instance_id),
                          fsync="background")
        return SessionEvidence(directory, session_id, fsync_interval=self.fsync_interval)

    def backlog_bytes(self) -> int:
        total = 0
        for directory in self.sessions_dir.iterdir():
            shipped = read_json(directory / "shipped.json") or {}
            for name, key in (("recording.bin", "recording_offset"), ("events.jsonl", "events_offset")):
                try:
                    total += max(0, (directory / name).stat().st_size - int(shipped.get(key, 0)))
                except FileNotFoundError:
                    continue
        return total


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class SessionEvidence:
    """One session's spool: its recording and its audit events."""

    __slots__ = ("_directory", "_events_fd", "closed", "recording", "session_id")

    def __init__(self, directory: Path, session_id: str, *, fsync_interval: float) -> None:
        self._directory = str(directory)  # a str costs less than a Path for the life of the session
        self.session_id = session_id
        self.recording = RecordingWriter(os.path.join(self._directory, "recording.bin"), session_id,
                                         fsync_interval=fsync_interval)
        self._events_fd = os.open(os.path.join(self._directory, "events.jsonl"),
                                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.closed = False

    @property
    def events_fd(self) -> int:
        return self._events_fd

    @property
    def directory(self) -> Path:
        return Path(self._directory)

    def record(self, direction: int, payload: bytes | bytearray | memoryview, kind: int = WIRE) -> None:
        self.recording.append(direction, kind, payload)

    def write_template(self, version: int, doc: Mapping[str, Any]) -> None:
        """The fields this session's compact events share (see contract.EventTemplate)."""
        write_json_atomic(self.directory / f"template-{version}.json", doc, fsync="background")

    def add_event(self, row: Mapping[str, Any]) -> None:
        os.write(self._events_fd, orjson.dumps(row, default=str, option=orjson.OPT_APPEND_NEWLINE))

    def close(self, summary: Mapping[str, Any], *, background: bool = False) -> None:
        """Nothing more is written; the files are made durable, the totals written and the session
        marked closed for the shipper — on the fsync thread when `background` (the event loop's way)."""
        if self.closed:
            return
        self.closed = True
        if background:
            in_background(self._seal, summary)
        else:
            self._seal(summary)

    def _seal(self, summary: Mapping[str, Any]) -> None:
        self.recording.close()
        os.fsync(self._events_fd)
        os.close(self._events_fd)
        totals = dict(summary, last_hash=self.recording.last_hash, recording_bytes=self.recording.bytes_written)
        write_json_atomic(self.directory / "summary.json", totals)
        (self.directory / "closed").touch()
