"""The C data path's engine on its own, over socket pairs (plaintext both sides): what it relays, records
and writes as evidence, and the three ways it talks to Python (judge, eject, terminate)."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from data_plane.core.guardrails import LOG, Verdict
from data_plane.core.recording import (
    FROM_CLIENT,
    FROM_GATEWAY,
    FROM_SERVER,
    WIRE,
    RecordingWriter,
    genesis,
    read_records,
    verified_prefix,
)
from data_plane.postgres import messages as m
from data_plane.postgres.tracker import StatementTracker, verdict_fields

_fastrelay = pytest.importorskip("data_plane.postgres._fastrelay")

SESSION = "s-fastrelay-test"


def answer(tag: str, *rows: bytes) -> bytes:
    """A result as PostgreSQL sends it: RowDescription, DataRows, CommandComplete, ReadyForQuery."""
    description = m.frame(b"T", b"\x00\x01" + m.cstring("c") + b"\x00" * 6 + b"\x00\x00\x00\x19" + b"\xff\xff"
                          + b"\xff\xff\xff\xff" + b"\x00\x00")
    return description + b"".join(m.data_row([row]) for row in rows) + m.frame(b"C", m.cstring(tag)) + \
        m.ready_for_query(b"I")


class Harness:
    def __init__(self, tmp: Path, shapes: Any = None, fsync_interval: float = 1.0) -> None:
        self.engine = _fastrelay.Engine(workers=1)
        self.client, client_gw = socket.socketpair()
        self.server, server_gw = socket.socketpair()
        self.gateway_ends = (client_gw, server_gw)
        for end in self.gateway_ends:
            end.setblocking(False)
        self.recording = RecordingWriter(tmp / "recording.bin", SESSION)
        self.events_path = tmp / "events.jsonl"
        self.events_fd = os.open(self.events_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.handle = self.engine.adopt(
            client_fd=client_gw.fileno(), client_ssl=None, client_early=b"", server_fd=server_gw.fileno(),
            server_ssl=None, server_early=b"", recording_fd=self.recording.fd, prev_hash=self.recording.prev_hash,
            seq=self.recording.seq, recording_bytes=0,
            next_sync=self.recording.next_sync if fsync_interval else 0.0, fsync_interval=fsync_interval,
            events_fd=self.events_fd, events_seq=1, template_version=1, record_parameters=True, max_len=1 << 20,
            shapes=shapes, standard_strings=True, context=None)
        self.tmp = tmp

    def completions(self, timeout: float = 5.0) -> list[tuple[Any, ...]]:
        ready, _, _ = select.select([self.engine.fileno()], [], [], timeout)
        assert ready, "no completion from the relay thread"
        return self.engine.completions()

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.events_path.read_bytes().splitlines()]

    def records(self, state: dict[str, Any]) -> list[Any]:
        self.recording.resume_from(state["prev_hash"], state["seq"], state["recording_bytes"], state["next_sync"])
        return list(read_records((self.tmp / "recording.bin").read_bytes(), genesis(SESSION)))

    def close(self) -> None:
        for sock in (self.client, self.server, *self.gateway_ends):
            sock.close()
        os.close(self.events_fd)
        self.recording.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    sock.settimeout(5)
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.close()


def test_relays_records_and_writes_the_statement_row(harness: Harness) -> None:
    query = m.query("SELECT 1")
    harness.client.sendall(query)
    assert recv_exactly(harness.server, len(query)) == query
    result = answer("SELECT 1", b"1")
    harness.server.sendall(result)
    assert recv_exactly(harness.client, len(result)) == result
    harness.client.sendall(m.terminate())
    harness.client.shutdown(socket.SHUT_WR)
    (kind, handle, _, state), = harness.completions()
    assert (kind, handle, state["state"]) == ("done", harness.handle, "done")
    assert (state["statements"], state["bytes_in"], state["bytes_out"]) == (1, len(query) + 5, len(result))
    records = harness.records(state)  # the chain verifies
    assert [(r.direction, r.payload) for r in records[:2]] == [(FROM_CLIENT, query), (FROM_SERVER, result)]
    (row,) = harness.events()
    assert row["statement"] == "SELECT 1" and row["command_tag"] == "SELECT 1" and row["rows"] == 1
    assert (row["seq"], row["tv"], row["status"], row["bytes"]) == (2, 1, "Success", len(result))


def test_a_result_in_pieces_that_split_frames_arrives_whole_recorded_and_counted(harness: Harness) -> None:
    """Reads that end mid-frame (a partial frame is carried to the next read), rows larger than the
    worker's buffer share (read onto in place), and more than the socket pair holds at once."""
    query = m.query("SELECT big")
    harness.client.sendall(query)
    recv_exactly(harness.server, len(query))
    rows = [b"r%06d" % i * (1 + i % 40) for i in range(3000)] + [b"x" * 300_000, b"y" * 70_000, b"z"]
    result = answer(f"SELECT {len(rows)}", *rows)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_exactly(harness.client, len(result))))
    reader.start()
    for start in range(0, len(result), 7_001):
        harness.server.sendall(result[start:start + 7_001])
    reader.join(10)
    assert received == [result]
    harness.client.sendall(m.terminate())
    harness.client.shutdown(socket.SHUT_WR)
    (kind, _, _, state), = harness.completions()
    assert kind == "done" and state["bytes_out"] == len(result)
    records = harness.records(state)
    assert b"".join(r.payload for r in records if r.direction == FROM_SERVER) == result
    (row,) = harness.events()
    assert (row["rows"], row["bytes"], row["command_tag"]) == (len(rows), len(result), f"SELECT {len(rows)}")


def test_a_function_call_hands_the_session_back_with_what_it_did_not_relay(harness: Harness) -> None:
    query = m.query("SELECT 2")
    harness.client.sendall(query)
    recv_exactly(harness.server, len(query))
    function_call = m.frame(b"F", b"\x00\x00\x04\xd2\x00\x00\x00\x00\x00\x00")
    harness.client.sendall(function_call)  # while SELECT 2 is still in flight
    (kind, _, _, state), = harness.completions()
    assert (kind, state["client_pending"]) == ("ejected", function_call)
    (group,) = state["tracker"]["groups"]
    assert group["simple"] and group["statements"][0]["text"] == b"SELECT 2"
    assert harness.events() == []  # the statement is Python's to finish now


def test_the_spool_is_written_in_place_then_cut_back_for_python_to_append_to(harness: Harness) -> None:
    """While the worker has the session its spool files are mapped: they end in zeros allocated and
    not written yet, which a reader (the shipper) stops at; a hand-back cuts them off, so the Python
    relay's appends follow on and the chain verifies across."""
    query = m.query("SELECT 1")
    harness.client.sendall(query)
    recv_exactly(harness.server, len(query))
    result = answer("SELECT 1", b"1")
    harness.server.sendall(result)
    recv_exactly(harness.client, len(result))
    written = 2 * (22 + 32) + len(query) + len(result)
    recording, events = (harness.tmp / "recording.bin").read_bytes(), harness.events_path.read_bytes()
    assert len(recording) > written and not recording[written:].strip(b"\0")
    assert verified_prefix(recording, genesis(SESSION))[0] == written
    line = events.index(b"\n") + 1
    assert len(events) > line and not events[line:].strip(b"\0")

    harness.client.sendall(m.frame(b"F", b"\x00\x00\x04\xd2\x00\x00\x00\x00\x00\x00"))
    (kind, _, _, state), = harness.completions()
    assert kind == "ejected" and state["recording_bytes"] == written
    assert (harness.tmp / "recording.bin").stat().st_size == written
    assert harness.events_path.stat().st_size == line
    harness.recording.resume_from(state["prev_hash"], state["seq"], state["recording_bytes"], state["next_sync"])
    harness.recording.append(FROM_GATEWAY, WIRE, b"the Python relay's")
    os.write(harness.events_fd, b'{"seq": 3}\n')
    records = list(read_records((harness.tmp / "recording.bin").read_bytes(), genesis(SESSION)))
    assert [r.payload for r in records] == [query, result, b"the Python relay's"]
    assert [row["seq"] for row in harness.events()] == [2, 3]


def test_a_busy_session_s_spool_windows_verify_whole_while_live_and_after(harness: Harness) -> None:
    """Past its first window a session's mapped pages are made writable ahead of the copies (and
    records over 4 KiB are written, not copied, between them): what a reader sees while it is live
    is whole records and lines up to zeros, and all of it once the session ends."""
    sent = []
    for i in range(900):
        query = m.query(f"SELECT {i}, '{'x' * (i % 50)}'")
        harness.client.sendall(query)
        recv_exactly(harness.server, len(query))
        result = answer("SELECT 1", b"y" * (6000 if i % 100 == 99 else i % 70))
        harness.server.sendall(result)
        recv_exactly(harness.client, len(result))
        sent += [query, result]
    recording = (harness.tmp / "recording.bin").read_bytes()
    written = sum(22 + len(p) + 32 for p in sent)
    assert written > 256 << 10 and verified_prefix(recording, genesis(SESSION))[0] == written
    assert not recording[written:].strip(b"\0")
    events = harness.events_path.read_bytes().rstrip(b"\0")
    assert events.endswith(b"\n") and len(events.splitlines()) == 900
    harness.client.sendall(m.terminate())
    harness.client.shutdown(socket.SHUT_WR)
    (kind, _, _, state), = harness.completions()
    assert kind == "done" and (harness.tmp / "recording.bin").stat().st_size == state["recording_bytes"]
    records = harness.records(state)
    assert [r.payload for r in records[:-1]] == sent and records[-1].payload == m.terminate()
    assert [row["seq"] for row in harness.events()] == list(range(2, 902))


def test_an_fsync_asked_for_every_record_leaves_no_descriptor_behind(tmp_path: Path) -> None:
    """fsync_interval 0: every record asks for an fsync, which the engine's syncer thread does on a
    duplicate of the descriptor and closes; the relay goes on meanwhile."""
    before = len(os.listdir("/proc/self/fd"))
    harness = Harness(tmp_path, fsync_interval=0.0)
    opened = len(os.listdir("/proc/self/fd"))
    try:
        for i in range(50):
            query = m.query(f"SELECT {i}")
            harness.client.sendall(query)
            assert recv_exactly(harness.server, len(query)) == query
            result = answer("SELECT 1", b"1")
            harness.server.sendall(result)
            assert recv_exactly(harness.client, len(result)) == result
        deadline = time.monotonic() + 5
        while len(os.listdir("/proc/self/fd")) > opened + 2 and time.monotonic() < deadline:  # the spool maps
            time.sleep(0.01)
        assert len(os.listdir("/proc/self/fd")) <= opened + 2
        harness.client.sendall(m.terminate())
        harness.client.shutdown(socket.SHUT_WR)
        (kind, _, _, state), = harness.completions()
        assert kind == "done" and state["seq"] == 101  # 50 queries, 50 results, the Terminate
    finally:
        harness.close()
        del harness
    assert len(os.listdir("/proc/self/fd")) <= before


# A full disk, played by RLIMIT_FSIZE in a child process (fallocate and writes past the limit fail with
# EFBIG, a short write at the limit): the mapping cannot grow, the appends fall back to writev and then
# fail, the session ends, and the file is cut back to whole records.
_FULL_DISK = """
import json, os, resource, signal, socket, sys
from pathlib import Path
from data_plane.core.recording import genesis, read_records
from data_plane.postgres import messages as m
from tests.test_fastrelay import SESSION, Harness, answer, recv_exactly

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
tmp = Path(sys.argv[1])
harness = Harness(tmp)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
relayed = 0
try:
    for i in range(200):
        query = m.query("SELECT %d" % i)
        harness.client.sendall(query)
        recv_exactly(harness.server, len(query))
        result = answer("SELECT 1", b"x" * int(sys.argv[2]))
        harness.server.sendall(result)
        recv_exactly(harness.client, len(result))
        relayed += 1
except (AssertionError, OSError, TimeoutError):
    pass
(kind, _, _, state), = harness.completions()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
data = (tmp / "recording.bin").read_bytes()
records = list(read_records(data, genesis(SESSION)))
print(json.dumps({"kind": kind, "reason": state["reason"], "relayed": relayed, "size": len(data),
                  "recording_bytes": state["recording_bytes"], "records": len(records)}))
"""


@pytest.mark.parametrize("row_size", [300, 6000])  # records copied into the mapping; written past its end
def test_a_full_disk_ends_the_session_and_leaves_only_whole_records(tmp_path: Path, row_size: int) -> None:
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path), str(row_size)], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kind"] == "done" and "cannot be written" in result["reason"]
    assert 0 < result["relayed"] < 200  # relayed while the records fit, not after
    assert result["size"] == result["recording_bytes"] <= 20_000  # cut back to the records it wrote whole
    assert result["records"] >= 2 * result["relayed"]


def test_large_reads_are_written_into_blocks_allocated_ahead_and_the_file_is_cut_back(harness: Harness) -> None:
    path = harness.tmp / "recording.bin"
    query = m.query("SELECT * FROM big")
    harness.client.sendall(query)
    recv_exactly(harness.server, len(query))
    result = answer("SELECT 40", *(bytes([65 + i % 26]) * 5000 for i in range(40)))  # ~200 KB of rows
    harness.server.sendall(result)
    assert recv_exactly(harness.client, len(result)) == result
    live = os.stat(path)
    assert live.st_size > len(result) and live.st_size % 4096 == 0  # a window ahead of what was written
    assert live.st_blocks * 512 >= live.st_size  # allocated, not a hole
    harness.client.sendall(m.terminate())
    harness.client.shutdown(socket.SHUT_WR)
    (kind, _, _, state), = harness.completions()
    assert kind == "done"
    assert os.stat(path).st_size == state["recording_bytes"]  # the zeros ahead are cut off
    records = harness.records(state)
    assert b"".join(r.payload for r in records if r.direction == FROM_SERVER) == result


def test_a_new_shape_is_judged_then_passes_for_good(tmp_path: Path) -> None:
    shapes = _fastrelay.ShapeSet()
    harness = Harness(tmp_path, shapes)
    try:
        first = m.query("SELECT abalance FROM accounts WHERE aid = 17")
        harness.client.sendall(first)
        (kind, handle, _, msg_type, body, shape), = harness.completions()
        assert (kind, msg_type, body) == ("judge", 0x51, first[5:])
        assert shape == b"SELECT abalance FROM accounts WHERE aid = ?"
        assert shapes.add(shape) and shapes.contains(shape) and len(shapes) == 1
        harness.engine.judged(handle, True)
        assert recv_exactly(harness.server, len(first)) == first
        harness.server.sendall(answer("SELECT 1", b"5"))
        recv_exactly(harness.client, len(answer("SELECT 1", b"5")))
        again = m.query("SELECT abalance FROM accounts WHERE aid = 90210")
        harness.client.sendall(again)
        assert recv_exactly(harness.server, len(again)) == again  # no judge this time
        assert not select.select([harness.engine.fileno()], [], [], 0.2)[0]
    finally:
        harness.close()


def no_completion(harness: Harness) -> bool:
    return not select.select([harness.engine.fileno()], [], [], 0.2)[0]


def test_a_statement_a_log_rule_matched_passes_with_the_verdict_and_its_shape_keeps_it(tmp_path: Path) -> None:
    shapes = _fastrelay.ShapeSet()
    harness = Harness(tmp_path, shapes)
    verdict = Verdict(LOG, "log-writes", "INSERT is not allowed", ("log-writes",))
    fields = verdict_fields(verdict)
    inserted = m.frame(b"C", m.cstring("INSERT 0 1")) + m.ready_for_query(b"I")
    try:
        first = m.query("INSERT INTO orders (amount) VALUES (17)")
        harness.client.sendall(first)
        (kind, handle, _, msg_type, body, shape), = harness.completions()
        assert (kind, msg_type, body, shape) == ("judge", 0x51, first[5:], b"INSERT INTO orders (amount) VALUES (?)")
        assert shapes.add(shape, fields) and shapes.verdict(shape) == fields[2]
        harness.engine.judged(handle, True, fields)
        assert recv_exactly(harness.server, len(first)) == first  # relayed, not handed back
        harness.server.sendall(inserted)
        recv_exactly(harness.client, len(inserted))
        again = m.query("INSERT INTO orders (amount) VALUES (90210)")
        harness.client.sendall(again)
        assert recv_exactly(harness.server, len(again)) == again
        assert no_completion(harness)  # no judge: the shape's verdict was cached with it
        harness.server.sendall(inserted)
        recv_exactly(harness.client, len(inserted))
        # a verdict Python does not cache (judged each time) still passes, on a prepared statement's Executes
        parse = m.frame(b"P", m.cstring("ins") + m.cstring("INSERT INTO orders (amount) VALUES ($1)") + b"\x00\x00")
        execute = (m.frame(b"B", m.cstring("") + m.cstring("ins") + b"\x00\x00\x00\x01\x00\x00\x00\x015\x00\x00")
                   + m.frame(b"E", m.cstring("") + b"\x00\x00\x00\x00"))
        sync = m.frame(b"S")
        harness.client.sendall(parse + execute + sync)
        (kind, handle, _, msg_type, _, _), = harness.completions()
        assert (kind, msg_type) == ("judge", 0x50)
        harness.engine.judged(handle, True, fields)
        assert recv_exactly(harness.server, len(parse + execute + sync)) == parse + execute + sync
        answers = m.frame(b"1") + m.frame(b"2") + inserted
        harness.server.sendall(answers)
        recv_exactly(harness.client, len(answers))
        harness.client.sendall(execute + sync)
        assert recv_exactly(harness.server, len(execute + sync)) == execute + sync
        assert no_completion(harness)
        harness.server.sendall(m.frame(b"2") + inserted)
        recv_exactly(harness.client, len(inserted) + 5)
        harness.client.sendall(m.terminate())
        harness.client.shutdown(socket.SHUT_WR)
        (kind, _, _, state), = harness.completions()
        assert (kind, state["statements"]) == ("done", 4)  # never handed back
        rows = harness.events()
        assert [row["statement"] for row in rows] == [
            "INSERT INTO orders (amount) VALUES (17)", "INSERT INTO orders (amount) VALUES (90210)",
            *["INSERT INTO orders (amount) VALUES ($1)"] * 2]
        for row in rows:
            assert (row["rule"], row["approval_id"], row["activity_name"]) == ("log-writes", None, "query")
            assert row["details"]["guardrail"] == {"action": "log", "rules": ["log-writes"]}
        assert rows[-1]["details"]["parameters"] == ["5"]
    finally:
        harness.close()


def test_a_session_handed_back_later_keeps_the_verdicts_of_what_is_in_flight(tmp_path: Path) -> None:
    shapes = _fastrelay.ShapeSet()
    harness = Harness(tmp_path, shapes)
    fields = verdict_fields(Verdict(LOG, "log-writes", "INSERT is not allowed", ("log-writes",)))
    try:
        parse = m.frame(b"P", m.cstring("ins") + m.cstring("INSERT INTO orders (amount) VALUES (1)") + b"\x00\x00")
        query = m.query("INSERT INTO orders (amount) VALUES (2)")
        harness.client.sendall(parse + m.frame(b"S"))
        (_, handle, *_), = harness.completions()
        harness.engine.judged(handle, True, fields)
        harness.client.sendall(query)
        (_, handle, _, _, _, shape), = harness.completions()
        shapes.add(shape, fields)
        harness.engine.judged(handle, True, fields)
        recv_exactly(harness.server, len(parse) + 5 + len(query))
        function_call = m.frame(b"F", b"\x00\x00\x04\xd2\x00\x00\x00\x00\x00\x00")
        harness.client.sendall(function_call)  # the FunctionCall goes back to Python, the INSERTs still in flight
        (kind, _, _, state), = harness.completions()
        assert kind == "ejected"
        tracker = state["tracker"]
        assert tracker["prepared"] == [("ins", "INSERT INTO orders (amount) VALUES (1)", (), fields[2])]
        assert [group["parse_verdict"] for group in tracker["groups"]] == [fields[2], None]
        assert tracker["groups"][1]["statements"][0]["verdict"] == fields[2]
        rows: list[Verdict | None] = []
        python = StatementTracker(lambda statement: rows.append(statement.verdict))
        python.restore(tracker)
        assert python.judged["ins"][1] == Verdict(LOG, "log-writes", "INSERT is not allowed", ("log-writes",))
        python.server_message(0x5A, b"I", 1.0)
        python.server_message(0x43, m.cstring("INSERT 0 1"), 1.0)
        python.server_message(0x5A, b"I", 1.0)
        assert [verdict.rule if verdict else None for verdict in rows] == ["log-writes"]
    finally:
        harness.close()


def test_terminate_sends_the_final_message_records_it_and_ends(harness: Harness) -> None:
    fatal = m.error_response("57P01", "terminating connection: the grant was revoked", severity="FATAL")
    harness.engine.terminate(harness.handle, fatal)
    assert recv_exactly(harness.client, len(fatal)) == fatal
    (kind, _, _, state), = harness.completions()
    assert kind == "done"
    assert recv_exactly(harness.server, 5) == m.terminate()  # the backend hears Terminate
    records = harness.records(state)
    assert [(r.direction, r.payload) for r in records] == [(FROM_GATEWAY, fatal)]


def batch_threads() -> set[int]:
    """This process's threads under SCHED_BATCH."""
    found = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.sched_getscheduler(int(tid)) == os.SCHED_BATCH:
                found.add(int(tid))
        except OSError:  # a thread that ended meanwhile
            continue
    return found


@pytest.mark.parametrize("batch", [True, False])
def test_relay_threads_run_under_sched_batch_when_asked(batch: bool) -> None:
    """Woken by a peer's bytes, a SCHED_BATCH relay thread does not preempt the running task (the default
    of the gateway, fast_path_batch_scheduling); the engine's other threads and Python's keep their policy."""
    before = batch_threads()
    engine = _fastrelay.Engine(workers=2, batch=batch)
    deadline = time.monotonic() + 5
    while batch and len(batch_threads() - before) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the threads set their policy as they start
    assert len(batch_threads() - before) == (2 if batch else 0)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    del engine
