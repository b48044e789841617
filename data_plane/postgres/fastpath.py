"""The C data path of the PostgreSQL relay: which sessions it takes, how they are handed over, how
they come back.

A session whose grant has no masking rules is relayed, once its greeting is sent, by a worker
thread of `_fastrelay` that never takes the GIL: TLS on the session's own OpenSSL objects (the
event loop's memory BIOs, taken over while the loop's transports are paused), frame scanning,
the recording (same records, same hash chain, same fsync policy as recording.py), statement
bookkeeping and evidence rows (pgtrack.h, the twin of tracker.py). Guardrails stay Python's: a
Query or Parse whose shape the rule set's cache does not already let through is sent here to be
judged; a statement no rule stops passes, its evidence carrying the verdict when a rule matched (a
`log` rule), and its shape is cached with that verdict for every session of the rule set when
every statement of the shape gets it. A statement blocked or held for an approval hands the
session back to the Python relay with its whole state (unprocessed and unsent bytes, the recording
chain, the statement tracker), which carries on as if it had relayed from the start. So does
anything the C path does not reproduce exactly: a FunctionCall, a statement that may hold a secret
(its evidence is redacted), text that is not UTF-8, binary float parameters.

The hand-over needs Python's ssl module and this module to share one libssl (a shared library,
not a statically linked copy); otherwise, or without the compiled module, every session stays on
the Python relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from control_plane.contract import EventTemplate
from data_plane import metrics
from data_plane.core.spool import read_json
from data_plane.core.stream import Stream
from data_plane.postgres.tracker import full_row_parts, verdict_fields

if TYPE_CHECKING:
    from data_plane.postgres.guard import StatementGuard
    from data_plane.postgres.session import Relay

log = logging.getLogger("proctor.gateway.postgres.fastpath")

try:
    from data_plane.postgres import _fastrelay
except ImportError:  # no compiler (or no OpenSSL headers) where this was installed
    _fastrelay = None


def _shares_libssl() -> bool:
    """Whether Python's _ssl is a shared module linked against the same libssl as _fastrelay."""
    if _fastrelay is None or _fastrelay.openssl_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        return False
    import _ssl

    path = getattr(_ssl, "__file__", None)
    try:
        return path is not None and b"libssl.so" in Path(path).read_bytes()
    except OSError:
        return False


AVAILABLE = _shares_libssl()


class _Side:
    """One connection as the hand-over sees it: its socket, its TLS object, its transports."""

    __slots__ = ("fd", "raw", "ssl_object", "stream", "tls")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.tls = stream.transport if stream.raw is not None else None  # the TLS transport, if any
        self.raw = stream.raw if stream.raw is not None else stream.transport
        self.ssl_object = self.tls.get_extra_info("ssl_object") if self.tls is not None else None
        sock = self.raw.get_extra_info("socket") if self.raw is not None else None
        self.fd = sock.fileno() if sock is not None else -1

    def pause(self) -> None:
        if self.tls is not None:
            # The TLS transport's own pause only stops delivering; a zero read limit stops the socket reads.
            self.tls.pause_reading()
            self.tls.set_read_buffer_limits(high=0, low=0)
        else:
            self.raw.pause_reading()

    def quiet(self) -> bool:
        """Nothing buffered for writing anywhere above the socket."""
        if self.raw is None or self.raw.is_closing() or self.raw.get_write_buffer_size():
            return False
        return self.tls is None or (not self.tls.is_closing() and self.tls.get_write_buffer_size() == 0)

    def restore(self) -> None:
        """Back to the event loop: reads resume once the relay resumes its transport."""
        if self.tls is not None:
            self.tls.set_read_buffer_limits()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            (self.tls or self.raw).abort()


class FastPath:
    """The C data path of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int, *, batch: bool = False) -> None:
        assert _fastrelay is not None
        self.engine = _fastrelay.Engine(workers=workers, batch=batch)
        self.relays: dict[int, tuple[Relay, _Side, _Side]] = {}
        loop.add_reader(self.engine.fileno(), self._completions)
        stats = self.engine.stats
        metrics.STATEMENTS_OK.sources.append(lambda: stats()["statements_ok"])
        metrics.STATEMENTS_ERROR.sources.append(lambda: stats()["statements_error"])
        metrics.STATEMENTS_SKIPPED.sources.append(lambda: stats()["statements_skipped"])

    # hand-over ---------------------------------------------------------------------------------
    def take(self, relay: Relay, client: Stream, backend: Stream) -> bool:
        """Hand the session's connections to the worker; False leaves them to the Python relay."""
        guard = relay.guard
        shapes = None
        if guard is not None:
            if guard.guardrails.needs_text:  # verdicts depend on the literal text: no shape cache
                return False
            shapes = guard_shapes(guard)
        sides = _Side(client), _Side(backend)
        if any(side.fd < 0 for side in sides):
            return False
        for side in sides:
            side.pause()
        if not all(side.quiet() for side in sides):
            for side in sides:
                side.restore()
            return False
        session = relay.session
        evidence = relay.evidence
        assert evidence is not None
        recording = evidence.recording
        info = session.info
        version = info.template_version
        template = read_json(evidence.directory / f"template-{version}.json")  # what the shipper would use
        full_rows = None if template is None else full_row_parts(EventTemplate.from_doc(template), session.session_id)
        try:
            handle = self.engine.adopt(
                client_fd=sides[0].fd, client_ssl=sides[0].ssl_object, client_early=client.take_buffered(),
                server_fd=sides[1].fd, server_ssl=sides[1].ssl_object, server_early=backend.take_buffered(),
                recording_fd=recording.fd, prev_hash=recording.prev_hash, seq=recording.seq,
                recording_bytes=recording.bytes_written, next_sync=recording.next_sync,
                fsync_interval=recording.fsync_interval, events_fd=evidence.events_fd, events_seq=info.events,
                template_version=version, record_parameters=info.record_parameters,
                max_len=relay.max_len, shapes=shapes, standard_strings=relay.standard_strings, context=None,
                full_rows=full_rows)
        except (ValueError, TypeError) as exc:  # a TLS object the worker cannot drive: stay in Python
            log.warning("session %s stays on the Python relay: %s", session.session_id, exc)
            for side in sides:
                side.restore()
            return False
        relay.fast = (self, handle)
        self.relays[handle] = (relay, *sides)
        metrics.FAST_PATH.labels("adopted").inc()
        return True

    def terminate(self, handle: int, payload: bytes) -> None:
        self.engine.terminate(handle, payload)

    # completions -------------------------------------------------------------------------------
    def _completions(self) -> None:
        for item in self.engine.completions():
            kind, handle = item[0], item[1]
            entry = self.relays.get(handle)
            if entry is None:
                continue
            try:
                if kind == "judge":
                    self._judge(handle, entry[0], item[3], item[4], item[5])
                else:
                    del self.relays[handle]
                    self._returned(entry, item[3])
            except Exception:
                log.exception("C data path: handling %s of a session failed", kind)
                entry[0].terminate_fast_failure()

    def _judge(self, handle: int, relay: Relay, msg_type: int, body: bytes, shape: bytes | None) -> None:
        metrics.FAST_PATH.labels("judged").inc()
        verdict, replacement, text = relay.judge(msg_type, body)
        if replacement is not None:  # blocked, or held for an approval: the Python relay does that
            self.engine.judged(handle, False)
            return
        # Allowed, as is or annotated (a `log` rule matched): the C path relays it and records the verdict.
        fields = None if verdict is None else verdict_fields(verdict)
        guard = relay.guard
        if shape is not None and guard is not None:
            query = text if text is not None else relay.statement_text(msg_type, body)
            if guard.holds_for_shape(query, shape.decode(), verdict):
                guard_shapes(guard).add(shape, fields)
        self.engine.judged(handle, True, fields)

    def _returned(self, entry: tuple[Relay, _Side, _Side], state: dict[str, Any]) -> None:
        relay, client, server = entry
        relay.fast = None
        evidence = relay.evidence
        assert evidence is not None
        evidence.recording.resume_from(state["prev_hash"], state["seq"], state["recording_bytes"], state["next_sync"])
        info = relay.session.info
        info.events = state["events_seq"]
        info.statements += state["statements"]
        info.bytes_in += state["bytes_in"]
        info.bytes_out += state["bytes_out"]
        metrics.FAST_PATH.labels("ended" if state["state"] == "done" else "ejected").inc()
        if state["state"] == "done" or relay.fast_closed is not None:
            client.abort()
            server.abort()
            if not relay.done.done():
                relay.done.set_result(None)
            if relay.fast_closed is not None:  # the session's close was waiting for this
                relay.fast_closed()
            return
        # Ejected: the Python relay carries on from exactly where the worker stopped.
        relay.standard_strings = bool(state["standard_strings"])
        relay.tracker.restore(state["tracker"])
        for side, unsent in ((client, state["client_unsent"]), (server, state["server_unsent"])):
            if unsent:
                side.raw.write(unsent)  # TLS records already made: below the TLS transport
            side.restore()
        relay.attach(state["client_pending"], state["server_pending"])


_SHAPES: weakref.WeakKeyDictionary[StatementGuard, Any] = weakref.WeakKeyDictionary()


def guard_shapes(guard: StatementGuard) -> Any:
    """The C-side set of shapes this rule set lets through, with their verdicts (one per StatementGuard)."""
    shapes = _SHAPES.get(guard)
    if shapes is None:
        assert _fastrelay is not None
        shapes = _SHAPES[guard] = _fastrelay.ShapeSet()
    return shapes


_PATHS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FastPath] = weakref.WeakKeyDictionary()


def for_loop(workers: int = 0, *, batch: bool = False) -> FastPath | None:
    """The running loop's C data path (started with `workers` relay threads, 0: one per CPU this
    process may run on; under SCHED_BATCH with `batch`); None where it is unavailable."""
    if not AVAILABLE:
        return None
    loop = asyncio.get_running_loop()
    path = _PATHS.get(loop)
    if path is None:
        path = _PATHS[loop] = FastPath(loop, workers or max(1, min(8, len(os.sched_getaffinity(0)))), batch=batch)
    return path


__all__ = ["AVAILABLE", "FastPath", "for_loop", "guard_shapes"]
