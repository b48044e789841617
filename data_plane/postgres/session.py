"""One PostgreSQL client connection through the gateway. Its life reads top to bottom:

    run → negotiate (TLS, startup) → authorize (the grant) → connect the backend (the injected
    credential) → relay, until either side ends or the grant expires or is revoked.

The relay scans frame headers and forwards the bytes it read untouched, one write per read;
only the few messages that evidence needs (Query, Parse, Bind, Execute, CommandComplete, Error,
ReadyForQuery…) are decoded."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson

from control_plane.contract import (
    CLASS_AUTHENTICATION,
    STATUS_FAILURE,
    STATUS_SUCCESS,
    GrantClaims,
    GrantInvalid,
    evidence_event,
)
from data_plane import metrics
from data_plane.core.context import GatewayContext
from data_plane.core.control_plane_client import ControlPlaneError
from data_plane.core.credentials import Credential
from data_plane.core.grants import VerifiedGrant
from data_plane.core.guardrails import ALLOW, BLOCK, REQUIRE_APPROVAL, Verdict
from data_plane.core.masking import HASH, Masking
from data_plane.core.recording import EVENT, FROM_CLIENT, FROM_GATEWAY, FROM_SERVER, META, WIRE, WIRE_REDACTED
from data_plane.core.redact import might_hold_secret, redact_conninfo, redact_statement
from data_plane.core.registry import CancelTarget
from data_plane.core.sealed import PayloadSealer, SealingUnavailable
from data_plane.core.session import SessionInfo, Statement, new_session_id
from data_plane.core.spool import SessionEvidence
from data_plane.core.stream import Stream
from data_plane.postgres import backend as pg_backend
from data_plane.postgres import fastpath
from data_plane.postgres import messages as m
from data_plane.postgres.auth import BackendAuthError
from data_plane.postgres.catalog import CATALOGS, CatalogUnavailable, describe_query, simple_query_rows
from data_plane.postgres.fastpath import FastPath
from data_plane.postgres.framescan import FrameError, FrameTooLarge, scan_frames
from data_plane.postgres.guard import guard_for, refusal, refused_parse, refused_query, stops
from data_plane.postgres.masker import LineageUnknown, ResultMasker, ResultPlan
from data_plane.postgres.tracker import SERVER_DECODED, StatementTracker

log = logging.getLogger("proctor.gateway.postgres")

_LENGTH = struct.Struct("!i")
CLIENT_SKIP = b"d"  # CopyData from the client is counted, not decoded
SERVER_SKIP = b"Dd"  # DataRow and CopyData from the server likewise
CLIENT_DECODED = frozenset(b"QPBESFCDHX")
REDACTABLE = frozenset(b"QPB")  # Query, Parse, Bind: where a secret can travel in the clear
GUARDED = frozenset(b"QPF")  # Query, Parse, FunctionCall: what guardrails judge
WRITE_HIGH_WATER = 1 << 20


class SessionEnded(Exception):
    """The client went away, or was refused; nothing more to say to it."""


class PostgresSession:
    __slots__ = ("_credential", "_credential_use", "_outcome", "_terminated", "cancel_key", "ctx", "evidence", "info",
                 "masking", "relay", "sealer", "session_id", "stream", "tls", "verified")

    def __init__(self, ctx: GatewayContext, stream: Stream) -> None:
        self.ctx = ctx
        self.stream = stream  # the client's connection, until the relay takes its transport over
        peer = stream.get_extra_info("peername") or ("", 0)
        self.info = SessionInfo(new_session_id(), "postgres", str(peer[0]), int(peer[1]), ctx.config.region)
        self.session_id = self.info.session_id
        self.evidence: SessionEvidence | None = None
        self.tls = False
        self.relay: Relay | None = None
        self.cancel_key: tuple[int, int] | None = None
        self._terminated: tuple[str, str] | None = None
        self._outcome = "refused"
        self.verified: VerifiedGrant | None = None  # the grant token and its claims (shared)
        self.masking: Masking | None = None
        self.sealer: PayloadSealer | None = None  # keeps the unmasked originals, encrypted
        self._credential: Credential | None = None  # kept only for masking's catalog lookups
        self._credential_use: dict[str, Any] | None = None  # for the connect event

    @property
    def grant_token(self) -> str:
        return self.verified.token if self.verified is not None else ""

    # ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        grant: GrantClaims | None = None
        backend: pg_backend.BackendConnection | None = None
        try:
            opened = await self.open()
            if opened is None:
                return
            backend, grant = opened
            await self.run_authorized(backend, grant)
        except SessionEnded:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except m.ProtocolViolation as exc:
            await self.refuse("08P01", f"protocol violation: {exc}")
        except Exception:
            log.exception("session %s failed", self.session_id)
            metrics.ERRORS.labels("session").inc()
            await self.refuse("XX000", "internal gateway error")
        finally:
            if backend is not None and self.relay is None:  # connected, but the relay never took it over
                backend.stream.close()
            self.close(grant)

    async def open(self) -> tuple[pg_backend.BackendConnection, GrantClaims] | None:
        """Negotiate, authorize, connect the backend. What only the start needs (the startup
        parameters, the password message) is not kept for the life of the session."""
        startup = await self.negotiate()
        if startup is None:
            return None
        grant = await self.authorize(startup)
        return await self.connect_backend(grant, startup), grant

    # ------------------------------------------------------------------------------------------
    async def read_startup_packet(self) -> m.StartupPacket:
        header = await self.stream.readexactly(4)
        (length,) = _LENGTH.unpack(header)
        if length < 8 or length > m.MAX_STARTUP_PACKET:
            raise m.ProtocolViolation("invalid startup packet length")
        return m.parse_startup_packet(header + await self.stream.readexactly(length - 4))

    async def negotiate(self) -> m.StartupMessage | None:
        """TLS (direct, or asked for) and the startup message; a cancel request is forwarded and
        ends the connection."""
        await asyncio.wait_for(self.direct_tls(), 30)
        while True:
            packet = await asyncio.wait_for(self.read_startup_packet(), 30)
            if isinstance(packet, m.SSLRequest):
                if self.tls or self.ctx.tls is None:
                    self.stream.write(b"N")
                    continue
                self.stream.write(b"S")
                await self.stream.drain()
                await self.start_tls()
            elif isinstance(packet, m.GSSENCRequest):
                self.stream.write(b"N")
            elif isinstance(packet, m.CancelRequest):
                await self.forward_cancel(packet)
                return None
            else:
                if packet.protocol != m.PROTOCOL_3_0:
                    raise m.ProtocolViolation("only protocol 3.0 is supported")
                if self.ctx.config.pg_require_tls and not self.tls:
                    await self.refuse("28000", "the Proctor gateway requires TLS: connect with sslmode=require",
                                      audit_reason="plaintext connection refused")
                    raise SessionEnded
                if self.ctx.draining:
                    await self.refuse("57P03", "the Proctor gateway is shutting down; reconnect")
                    raise SessionEnded
                return packet

    async def direct_tls(self) -> None:
        """A PostgreSQL 17 client may open with its TLS handshake instead of an SSLRequest: the
        first byte, peeked and left unread for OpenSSL, tells which."""
        first = await self.stream.peek()
        if not first:
            raise SessionEnded  # gone without a word
        if first != m.TLS_HANDSHAKE:
            self.stream.resume()
            return
        if self.ctx.tls is None:
            log.info("session %s: a direct TLS connection and no TLS certificate to answer it: closed",
                     self.session_id)
            raise SessionEnded
        await self.start_tls()
        if self.stream.get_extra_info("ssl_object").selected_alpn_protocol() != m.ALPN_PROTOCOL:
            # As PostgreSQL 17: no ALPN, no proof the client meant to speak PostgreSQL over this TLS.
            await self.refuse("08P01", "received direct SSL connection request without ALPN protocol "
                                       "negotiation extension", audit_reason="direct TLS without ALPN refused")
            raise SessionEnded

    async def start_tls(self) -> None:
        assert self.ctx.tls is not None
        if self.stream.buffered:  # read before the handshake, they would pass for encrypted (CVE-2021-23214)
            raise m.ProtocolViolation("received unencrypted data before the TLS handshake")
        try:
            await self.stream.start_tls(self.ctx.tls, server_side=True)
        except ssl.SSLError as exc:
            log.info("session %s: TLS handshake failed: %s", self.session_id, exc)
            raise SessionEnded from exc
        self.tls = True

    async def forward_cancel(self, request: m.CancelRequest) -> None:
        target = self.ctx.registry.cancel_target(request.pid, request.secret)
        if target is None:
            return  # as PostgreSQL does: say nothing about unknown keys
        if target.session is not None and target.session.cancel_hold():
            return  # the statement was held at the gateway: the backend never saw it
        with contextlib.suppress(OSError, TimeoutError):
            await pg_backend.send_cancel(target.host, target.port, target.pid, target.secret)

    # ------------------------------------------------------------------------------------------
    def open_evidence(self, startup: m.StartupMessage) -> SessionEvidence:
        if self.evidence is None:
            self.evidence = self.ctx.spool.open_session(self.session_id, {
                "protocol": "postgres", "started_at": self.info.started_at, "region": self.info.region,
                "client_ip": self.info.client_ip, "client_port": self.info.client_port,
                "client_user": startup.params.get("user"), "client_database": startup.params.get("database"),
                "application_name": startup.params.get("application_name"), "tls": self.tls,
            })
            self.info.on_template = self.evidence.write_template
        return self.evidence

    async def authorize(self, startup: m.StartupMessage) -> GrantClaims:
        """Ask for the password (the grant JWT, over TLS) and verify it offline."""
        evidence = self.open_evidence(startup)
        self.stream.write(m.authentication(m.AUTH_CLEARTEXT))
        await self.stream.drain()
        msg_type, body = await asyncio.wait_for(pg_backend.read_message(self.stream, 1 << 16), 60)
        if msg_type != b"p":
            raise m.ProtocolViolation("expected a password message")
        try:
            verified = await self.ctx.authority.verify(m.parse_password(body))
            grant = verified.claims
            requested = startup.params.get("database")
            if grant.target_kind != "postgres":
                raise GrantInvalid(f"grant is for a {grant.target_kind} target")
            if requested and grant.database and requested != grant.database:
                raise GrantInvalid(f"grant is for database {grant.database!r}, not {requested!r}")
            self.masking = self.masking_for(grant)
        except GrantInvalid as exc:
            evidence.add_event(evidence_event(
                CLASS_AUTHENTICATION, "logon", status=STATUS_FAILURE, region=self.info.region,
                status_detail=str(exc), session_id=self.session_id, src_ip=self.info.client_ip,
                src_port=self.info.client_port, details={"mechanism": "grant", "protocol": "postgres"}))
            metrics.SESSIONS.labels("postgres", "refused").inc()
            await self.refuse("28P01", f"Proctor grant rejected: {exc}")
            raise SessionEnded from exc
        self.verified = verified
        self.info.grant = grant
        self.info.database = requested or grant.database
        self.info.backend_user = grant.backend_role
        self.info.record_parameters = True
        # The recording holds the grant's id, not the bearer token itself.
        evidence.record(FROM_CLIENT, m.password_message(f"<grant {grant.grant_id}>"), WIRE_REDACTED)
        evidence.add_event(evidence_event(
            CLASS_AUTHENTICATION, "logon", identity=grant.identity, region=self.info.region,
            session_id=self.session_id, grant_id=grant.grant_id, target_name=grant.target,
            src_ip=self.info.client_ip, src_port=self.info.client_port, policy_name=grant.policy_name,
            policy_version=grant.policy_version, details={"mechanism": "grant", "protocol": "postgres"}))
        return grant

    def masking_for(self, grant: GrantClaims) -> Masking | None:
        """The grant's masking rules, or None; rules the gateway cannot enforce refuse the session."""
        if not grant.masking:
            return None
        key = self.ctx.config.masking_hash_key
        try:
            masking = Masking.from_docs(grant.masking, hash_key=(key or "").encode())
        except (ValueError, KeyError) as exc:
            raise GrantInvalid(f"the grant's masking rules cannot be enforced: {exc}") from exc
        if not key and any(r.method.method == HASH for r in masking.rules):
            raise GrantInvalid("the grant's masking rules use a keyed hash and this gateway has no masking key")
        return masking or None

    async def lookup(self, job: tuple[str, Any]) -> Any:
        """What the masker needs from the catalog, read on the gateway's own backend connection
        (the injected credential again; the client's session is never used for it)."""
        kind, subject = job
        if kind == "sealing":
            assert self.sealer is not None
            await self.sealer.replenish()
            return None
        grant = self.info.grant
        assert grant is not None and self._credential is not None
        catalog = CATALOGS.for_database(grant.target, self.info.database or "")
        if kind == "catalog":
            return await catalog.get(self.catalog_queries, missing=subject)
        return await self.catalog_queries_describe(subject)

    async def _catalog_connection(self) -> pg_backend.BackendConnection:
        assert self._credential is not None
        config = self.ctx.config
        try:
            return await pg_backend.connect(
                self._credential, self.info.database, {"application_name": "proctor-gateway-catalog"},
                timeout=config.backend_connect_timeout, max_message=config.max_message_bytes,
                ca_file=config.backend_ca_file)
        except (pg_backend.BackendRefused, pg_backend.BackendUnavailable, BackendAuthError) as exc:
            raise CatalogUnavailable(f"cannot read the target's catalog: {exc}") from exc

    async def catalog_queries(self, queries: list[str]) -> list[list[list[str | None]]]:
        connection = await self._catalog_connection()
        try:
            return await simple_query_rows(connection.stream, queries)
        finally:
            connection.stream.close()

    async def catalog_queries_describe(self, query: str) -> list[m.FieldDescription] | None:
        connection = await self._catalog_connection()
        try:
            return await describe_query(connection.stream, query)
        finally:
            connection.stream.close()

    async def connect_backend(self, grant: GrantClaims, startup: m.StartupMessage) -> pg_backend.BackendConnection:
        """Fetch the credential and log in as the backend role; on an authentication failure
        (a rotation in progress) refresh once, then try the pending version."""
        attempts = ({"fresh": False}, {"fresh": True}, {"pending": True})
        last_error = "backend authentication failed"
        for attempt in attempts:
            try:
                credential, source = await self.ctx.credentials.get(self.grant_token, grant, self.session_id,
                                                                    **attempt)
            except ControlPlaneError as exc:
                if exc.status == 404 and attempt.get("pending"):
                    break
                await self.fail_connect("08006", "cannot obtain the target's credential", f"control plane: {exc}")
                raise SessionEnded from exc
            try:
                backend = await pg_backend.connect(
                    credential, self.info.database, startup.params, timeout=self.ctx.config.backend_connect_timeout,
                    max_message=self.ctx.config.max_message_bytes, ca_file=self.ctx.config.backend_ca_file)
            except pg_backend.BackendRefused as exc:
                if exc.authentication_failed:
                    self.ctx.credentials.forget(grant)
                    last_error = "the target refused the injected credential"
                    continue
                await self.fail_connect(exc.sqlstate, exc.fields.get("M", "backend refused the connection"),
                                        f"backend: {exc.sqlstate}")
                raise SessionEnded from exc
            except (pg_backend.BackendUnavailable, BackendAuthError) as exc:
                await self.fail_connect("08006", f"cannot connect to target {grant.target}: {exc}", str(exc))
                raise SessionEnded from exc
            if self.masking is not None:
                self._credential = credential
            self._credential_use = {"source": source, "version_id": credential.version_id,
                                    "backend_tls": backend.tls, **_endpoint(credential)}
            return backend
        await self.fail_connect("28000", f"cannot log in to target {grant.target}: {last_error}", last_error)
        raise SessionEnded

    async def fail_connect(self, code: str, message: str, reason: str) -> None:
        if self.evidence is not None:
            self.evidence.add_event(self.info.event("connect", status=STATUS_FAILURE, status_detail=reason,
                                                    sqlstate=code))
        metrics.SESSIONS.labels("postgres", "backend_failed").inc()
        await self.refuse(code, message)

    # ------------------------------------------------------------------------------------------
    async def run_authorized(self, backend: pg_backend.BackendConnection, grant: GrantClaims) -> None:
        ctx = self.ctx
        relay = self.relay = await self.start_relay(backend)
        ctx.registry.add(self, grant.grant_id)
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, grant.expires_at - time.time()), self.terminate, "57P01",
            "terminating connection: the Proctor grant expired")
        try:
            if grant.grant_id in ctx.authority.revoked:
                self.terminate("57P01", "terminating connection: the grant was revoked")
            await relay.run(self.stream)
        finally:
            expiry.cancel()
            ctx.registry.remove(self, grant.grant_id)

    async def start_relay(self, backend: pg_backend.BackendConnection) -> Relay:
        """Greet the client as the backend did, and hand both connections to a Relay (what only
        the greeting needs is not kept for the life of the session)."""
        ctx = self.ctx
        evidence = self.evidence
        assert evidence is not None
        self.cancel_key = ctx.registry.new_cancel_key(
            CancelTarget(backend.host, backend.port, backend.pid, backend.secret, session=self))
        snapshot = None
        if self.masking is not None:
            # Masked results need the catalog: read it (or take the cached copy) before the first query.
            try:
                snapshot = await self.lookup(("catalog", []))
            except (CatalogUnavailable, OSError, TimeoutError, m.ProtocolViolation) as exc:
                backend.stream.close()
                await self.fail_connect("XX000", "Proctor cannot enforce this grant's masking: the target's "
                                                 "catalog is unavailable", f"masking: {exc}")
                raise SessionEnded from exc
            if ctx.sealing is not None:
                # The unmasked originals are kept only sealed under the break-glass key: no key, no session.
                self.sealer = ctx.sealing.sealer(self.session_id, evidence.recording.append)
                try:
                    await self.sealer.open()
                except SealingUnavailable as exc:
                    backend.stream.close()
                    await self.fail_connect("XX000", "Proctor cannot enforce this grant's masking: the "
                                                     "break-glass key is unavailable", f"sealing: {exc}")
                    raise SessionEnded from exc
        greeting = b"".join([m.authentication(m.AUTH_OK), *backend.startup_frames,
                             m.backend_key_data(*self.cancel_key), m.ready_for_query(backend.transaction_status)])
        evidence.add_event(self.info.event("connect", details={"credential": self._credential_use,
                                                               "client_tls": self.tls}))
        self._credential_use = None
        evidence.record(FROM_SERVER, greeting)
        self.stream.write(greeting)
        self._outcome = "completed"
        metrics.SESSIONS.labels("postgres", "opened").inc()

        tracker = StatementTracker(self.statement_done, record_parameters=self.info.record_parameters)
        relay = Relay(self, tracker, backend)
        if relay.masker is not None:
            relay.masker.snapshot = snapshot
        backend.startup_frames = []  # relayed in the greeting and read by the Relay: no longer needed
        return relay

    def cancel_hold(self) -> bool:
        return self.relay is not None and self.relay.cancel_hold()

    def statement_done(self, statement: Statement) -> None:
        self.info.statements += 1
        if self.evidence is not None:
            self.evidence.add_event(self.info.statement_event(statement))
        if statement.sqlstate or statement.error:
            metrics.STATEMENTS_ERROR.value += 1
        elif statement.skipped:
            metrics.STATEMENTS_SKIPPED.value += 1
        else:
            metrics.STATEMENTS_OK.value += 1

    def terminate(self, code: str, message: str) -> None:
        """End the session now with a FATAL error to the client (revocation, expiry, drain)."""
        if self._terminated is not None:
            return
        self._terminated = (code, message)
        if self.relay is not None:
            self.relay.terminate(m.error_response(code, message, severity="FATAL"))

    # ------------------------------------------------------------------------------------------
    async def refuse(self, code: str, message: str, *, audit_reason: str | None = None) -> None:
        """A FATAL error to the client, then close (best effort: the client may be gone).
        `audit_reason`: a refusal before any grant was presented (no session evidence exists yet, and
        a port scan must not open one per connection): counted and logged instead."""
        payload = m.error_response(code, message, severity="FATAL")
        if audit_reason is not None:
            metrics.SESSIONS.labels("postgres", "refused").inc()
            log.info("session %s from %s:%s: %s", self.session_id, self.info.client_ip, self.info.client_port,
                     audit_reason)
        if self.evidence is not None:
            self.evidence.record(FROM_GATEWAY, payload)
        with contextlib.suppress(Exception):
            self.stream.write(payload)
            await asyncio.wait_for(self.stream.drain(), 5)

    def close(self, grant: GrantClaims | None) -> None:
        if self.relay is not None and self.relay.fast is not None:
            # The C data path still writes to the connections and the spool: it ends the session first.
            self.relay.fast_closed = lambda: self.close(grant)
            self.relay.close_backend()
            return
        if self.cancel_key is not None:
            self.ctx.registry.drop_cancel_key(self.cancel_key)
        with contextlib.suppress(Exception):
            self.stream.close()
        if self.relay is not None:
            self.relay.close_backend()
            self.relay.tracker.abandon(time.monotonic())
        if self.sealer is not None:
            self.sealer.close()
        evidence = self.evidence
        if evidence is None:
            return
        ended = time.time()
        if grant is not None and self._outcome == "completed":
            details: dict[str, Any] = {"statements": self.info.statements, "bytes_in": self.info.bytes_in,
                                       "bytes_out": self.info.bytes_out,
                                       "duration_s": round(ended - self.info.started_at, 3)}
            if self._terminated:
                details["terminated"] = {"sqlstate": self._terminated[0], "message": self._terminated[1]}
            if self.sealer is not None:
                details["sealed"] = self.sealer.stats()
            evidence.add_event(self.info.event("disconnect", details=details, bytes=self.info.bytes_in +
                                               self.info.bytes_out, status=STATUS_SUCCESS))
            metrics.BYTES.labels("postgres", "in").inc(self.info.bytes_in)
            metrics.BYTES.labels("postgres", "out").inc(self.info.bytes_out)
        try:
            evidence.close(self.info.summary(ended), background=True)
        except OSError:
            log.exception("could not close the spool of session %s", self.session_id)


def _endpoint(credential: Credential) -> dict[str, Any]:
    return {"backend_host": credential.host, "backend_port": credential.port, "backend_user": credential.username}


class _Side(asyncio.Protocol):
    """One end of the relay: what it reads goes to the Relay, which writes to the other end."""

    __slots__ = ("from_client", "received", "relay")

    def __init__(self, relay: Relay, from_client: bool) -> None:
        self.relay = relay
        self.from_client = from_client
        self.received = relay.from_client if from_client else relay.from_server

    def data_received(self, data: bytes) -> None:
        self.received(data)

    def eof_received(self) -> bool:
        self.relay.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.finish()

    def pause_writing(self) -> None:
        self.relay.pause_reading(from_client=not self.from_client)

    def resume_writing(self) -> None:
        self.relay.resume_reading(from_client=not self.from_client)


class Relay:
    __slots__ = ("backend", "client", "client_tail", "decided", "done", "evidence", "fast", "fast_closed",
                 "from_server", "guard", "hold", "lookup", "masker", "max_len", "pending_terminate", "policy_label",
                 "record", "rewritten", "server", "server_chunk", "server_tail", "session", "standard_strings",
                 "tracker")

    def __init__(self, session: PostgresSession, tracker: StatementTracker,
                 backend: pg_backend.BackendConnection) -> None:
        self.session = session
        self.tracker = tracker
        self.backend = backend
        self.evidence = session.evidence
        assert self.evidence is not None
        self.record = self.evidence.recording.append  # the hot path calls the writer directly
        self.max_len = session.ctx.config.max_message_bytes
        grant = session.info.grant
        # No guardrails in the grant: no statement is parsed at all (the fast path stays fast).
        self.guard = guard_for(grant.guardrails) if grant is not None else None
        self.policy_label = f"{grant.policy_name} v{grant.policy_version}" if grant is not None else ""
        self.standard_strings = True
        self.hold: Hold | None = None  # a statement awaiting approval, and everything the client sent after it
        self.decided: dict[bytes, Verdict] = {}  # approval outcomes, by the held message's bytes
        for frame_bytes in backend.startup_frames:
            if frame_bytes[:1] == b"S":
                self.parameter_status(frame_bytes[5:])
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.client_tail = b""
        self.server_tail = b""
        self.server_chunk = b""  # the chunk from_server_plain is handling, for notable_frame
        self.rewritten: list[tuple[int, int, bytes]] | None = None  # its frames to replace
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending_terminate: bytes | None = None
        self.fast: tuple[FastPath, int] | None = None  # (the C data path, its handle) while it relays
        self.fast_closed: Callable[[], None] | None = None  # the session's close, waiting for the C data path
        # Masking: results pass through the masker; the server stream waits while it looks up lineage.
        self.masker: ResultMasker | None = None
        self.lookup: tuple[str, Any] | None = None
        # What the server sends goes through the masker when the grant masks anything.
        self.from_server: Callable[[bytes], None] = self.from_server_plain
        masking = getattr(session, "masking", None)
        if masking is not None:
            self.masker = ResultMasker(masking, self.mask_event, on_lineage=self.lineage_event)
            self.from_server = self.from_server_masked

    async def run(self, client: Stream) -> None:
        backend = self.backend.stream
        assert client.transport is not None and backend.transport is not None
        self.client, self.server = client.transport, backend.transport
        for transport in (self.client, self.server):
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.masker is None and self.pending_terminate is None and self.session.ctx.config.fast_path:
            config = self.session.ctx.config
            fast = fastpath.for_loop(config.fast_path_workers, batch=config.fast_path_batch_scheduling)
            if fast is not None and fast.take(self, client, backend):
                await self.done
                return
        # Bytes the streams already read belong to the relay now.
        self.attach(client.take_buffered(), backend.take_buffered())
        await self.done

    def attach(self, client_early: bytes, server_early: bytes) -> None:
        """Relay from here on, starting with what was read already (by the streams during the start,
        or by the C data path before it handed the session back)."""
        assert self.client is not None and self.server is not None
        self.client.set_protocol(_Side(self, from_client=True))
        self.server.set_protocol(_Side(self, from_client=False))
        if self.pending_terminate is not None:
            self.terminate(self.pending_terminate)
        if server_early:
            self.from_server(server_early)
        if client_early:
            self.from_client(client_early)
        if self.client.is_closing() or self.server.is_closing():  # one side went away during the start
            self.finish()
        for transport in (self.client, self.server):
            if not transport.is_closing() and (transport is self.server or self.hold is None):
                transport.resume_reading()

    # client → server ---------------------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        if self.done.done():
            return
        if self.hold is not None:  # nothing overtakes a held statement
            self.hold.buffer += data
            return
        buf = self.client_tail + data if self.client_tail else data
        try:
            end, events, trailing = scan_frames(buf, 0, CLIENT_SKIP, self.max_len)
        except FrameTooLarge as exc:
            self.fail_protocol("54000", f"message of {exc.length} bytes exceeds the gateway's limit of "
                                        f"{self.max_len} bytes")
            return
        except FrameError as exc:
            self.fail_protocol("08P01", f"invalid message framing: {exc}")
            return
        if end == 0:
            self.client_tail = buf
            return
        chunk = buf if end == len(buf) else buf[:end]
        redact = False
        copied = trailing  # CopyData frames: counted, not decoded
        tracker = self.tracker
        guard = self.guard
        masker = self.masker
        stopped: list[tuple[int, int, bytes, Verdict]] | None = None
        held: Hold | None = None
        try:
            for index, (msg_type, offset, size, skipped) in enumerate(events):
                copied += skipped
                if msg_type not in CLIENT_DECODED:
                    continue
                body = chunk[offset + 5:offset + size]
                if msg_type in REDACTABLE and might_hold_secret(body):
                    redact = True
                verdict = text = None
                if guard is not None and msg_type in GUARDED:
                    verdict, replacement, text = self.judge(msg_type, body)
                    if verdict is not None and verdict.action == REQUIRE_APPROVAL:
                        # Relay what came before; hold this statement and all that follows it.
                        held = Hold(bytes(chunk[offset:]) + bytes(buf[end:]), bytes(chunk[offset:offset + size]),
                                    verdict, text or self.statement_text(msg_type, body))
                        events = events[:index]
                        chunk = chunk[:offset]
                        end = offset
                        copied = sum(e[3] for e in events)
                        break
                    if replacement is not None:
                        stopped = stopped or []
                        stopped.append((offset, size, replacement, verdict))  # type: ignore[arg-type]
                tracker.client_message(msg_type, body, verdict, text)
                if masker is not None:
                    masker.client_message(msg_type, body)
        except m.ProtocolViolation as exc:
            self.fail_protocol("08P01", f"protocol violation: {exc}")
            return
        if copied:
            tracker.client_copy_bytes(end)
        if not chunk:
            pass
        elif redact:
            self.record(FROM_CLIENT, WIRE_REDACTED, _redacted(chunk, events))
        else:
            self.record(FROM_CLIENT, WIRE, chunk)
        forwarded = chunk
        if stopped:
            forwarded = _replace_frames(chunk, [(o, s, r) for o, s, r, _ in stopped])
            for *_, verdict in stopped:
                self.record(META, EVENT, orjson.dumps({"guardrail": verdict.action, "rule": verdict.rule,
                                                       "reason": verdict.reason, "relayed": "refused statement"}))
        self.session.info.bytes_in += end
        if forwarded:
            self.server.write(forwarded)  # type: ignore[union-attr]
        if held is not None:
            self.client_tail = b""
            self.start_hold(held)
            return
        self.client_tail = buf[end:] if end < len(buf) else b""

    # server → client ---------------------------------------------------------------------------
    def from_server_plain(self, data: bytes) -> None:
        if self.done.done():
            return
        buf = self.server_tail + data if self.server_tail else data
        scanned = self.scan_server(buf)
        if scanned is None:
            return
        end, events, trailing = scanned
        chunk = buf if end == len(buf) else buf[:end]
        self.server_chunk = chunk
        try:
            self.tracker.server_frames(chunk, events, end, trailing, time.monotonic(), self.notable_frame)
        except m.ProtocolViolation as exc:
            self.rewritten = None
            self.fail_protocol("08P01", f"the target sent an invalid message: {exc}")
            return
        finally:
            self.server_chunk = b""
        if self.rewritten is not None:
            # The backend refused the placeholder the gateway sent instead of a blocked statement:
            # the client hears why, in the backend's place.
            chunk = _replace_frames(chunk, self.rewritten)
            self.rewritten = None
        self.record(FROM_SERVER, WIRE, chunk)
        self.session.info.bytes_out += end
        self.client.write(chunk)  # type: ignore[union-attr]
        self.server_tail = buf[end:] if end < len(buf) else b""

    def scan_server(self, buf: bytes) -> tuple[int, list[tuple[int, int, int, int]], int] | None:
        """The complete frames of what the server sent; None when there are none yet (kept as the
        tail) or the stream is malformed (the session ends)."""
        try:
            end, events, trailing = scan_frames(buf, 0, SERVER_SKIP, self.max_len)
        except FrameError as exc:
            self.fail_protocol("08P01", f"the target sent an invalid message: {exc}")
            return None
        if end == 0:
            self.server_tail = buf
            return None
        return end, events, trailing

    def refused_error(self, answered: Statement) -> bytes:
        """The error the client hears in place of the backend's refusal of a stopped statement's
        placeholder; the statement's evidence carries it."""
        assert answered.verdict is not None
        refused = refusal(answered.verdict, policy=self.policy_label)
        fields = m.error_fields(refused[5:])
        answered.sqlstate, answered.error = fields["C"], fields["M"]
        return refused

    def notable_frame(self, msg_type: int, offset: int, size: int, answered: Statement | None) -> None:
        """An ErrorResponse or ParameterStatus of the chunk `from_server_plain` is handling."""
        if msg_type == 0x53:  # ParameterStatus
            if self.guard is not None:
                self.parameter_status(self.server_chunk[offset + 5:offset + size])
        elif answered is not None and answered.verdict is not None and stops(answered.verdict):
            # Before any later frame completes the statement: its evidence carries the rewritten error.
            if self.rewritten is None:
                self.rewritten = []
            self.rewritten.append((offset, size, self.refused_error(answered)))

    def from_server_masked(self, data: bytes) -> None:
        """`from_server_plain` for a grant with masking rules: the same bookkeeping, plus the masker's
        rewrites of DataRows, CopyData rows and errors, and a pause while lineage is looked up."""
        if self.done.done():
            return
        if self.lookup is not None:
            self.server_tail += data
            return
        buf = self.server_tail + data if self.server_tail else data
        sealer = self.session.sealer
        if sealer is not None and sealer.starved(len(buf)):
            # The sealing key is spent and the next one is on its way: hold the stream, lose nothing.
            self.server_tail = buf
            self.start_lookup(("sealing", None))
            return
        scanned = self.scan_server(buf)
        if scanned is None:
            return
        end, events, trailing = scanned
        chunk = buf if end == len(buf) else buf[:end]
        tracker = self.tracker
        masker = self.masker
        assert masker is not None
        now = time.monotonic()
        pos = rows = frame_end = 0
        rewritten: list[tuple[int, int, bytes]] = []
        job: tuple[str, Any] | None = None
        try:
            for msg_type, offset, size, skipped in events:
                if skipped:
                    self.mask_region(chunk, frame_end, offset, rewritten)
                rows += skipped
                body = chunk[offset + 5:offset + size]
                if msg_type in (0x54, 0x48):  # RowDescription, CopyOutResponse: lineage first
                    job = masker.wait_for(msg_type, body)
                    if job is not None:
                        end, trailing = offset, 0
                        break
                replaced = False
                if msg_type in SERVER_DECODED:
                    if rows:
                        tracker.rows(rows)
                        rows = 0
                    tracker.server_bytes(offset + size - pos)
                    pos = offset + size
                    answered = tracker.server_message(msg_type, body, now)
                    if answered is not None and answered.verdict is not None and stops(answered.verdict):
                        rewritten.append((offset, size, self.refused_error(answered)))
                        replaced = True
                elif msg_type == 0x53 and self.guard is not None:  # ParameterStatus
                    self.parameter_status(body)
                replacement = masker.server_message(msg_type, body)
                if replacement is not None and not replaced:
                    rewritten.append((offset, size, replacement))
                frame_end = offset + size
            else:
                if trailing:
                    self.mask_region(chunk, frame_end, end, rewritten)
        except (m.ProtocolViolation, struct.error) as exc:
            self.fail_protocol("08P01", f"the target sent an invalid message: {exc}")
            return
        except LineageUnknown as exc:
            self.fail_protocol("XX000", f"Proctor withholds a result it cannot mask: {exc}")
            return
        rows += trailing
        if rows:
            tracker.rows(rows)
        if end > pos:
            tracker.server_bytes(end - pos)
        original = chunk if end == len(chunk) else chunk[:end]
        out = _replace_frames(original, rewritten) if rewritten else original
        if out:
            self.record(FROM_SERVER, WIRE, out)
            if rewritten and self.session.sealer is not None:
                try:
                    self.session.sealer.seal(FROM_SERVER, original)
                except SealingUnavailable as exc:
                    self.fail_protocol("XX000", f"Proctor cannot keep this result's evidence: {exc}")
                    return
            self.session.info.bytes_out += len(out)
            self.client.write(out)  # type: ignore[union-attr]
        self.server_tail = buf[end:] if end < len(buf) else b""
        if job is not None:
            self.start_lookup(job)

    def mask_region(self, chunk: bytes, start: int, stop: int, rewritten: list[tuple[int, int, bytes]]) -> None:
        """Mask the DataRows or CopyData rows in chunk[start:stop] (frames the scan skipped)."""
        masker = self.masker
        assert masker is not None
        copy = masker.copy
        plan = None
        if copy is None:
            if chunk[start] != 0x44:  # CopyData of a COPY nothing masks
                return
            plan = masker.execute_plan()
            if plan is None or not plan.masks:
                return
        if plan is not None:
            masked_rows = masker.mask_rows(plan, chunk, start, stop)
            if masked_rows is not None:
                rewritten.append((start, stop - start, masked_rows))
            return
        region = memoryview(chunk)[start:stop]
        _, frames, _ = scan_frames(region, 0, b"", self.max_len)
        for msg_type, offset, size, _ in frames:
            body = bytes(region[offset + 5:offset + size])
            if msg_type == 0x64 and copy is not None:
                masked = masker.mask_copy_row(body)
                if masked is not None:
                    rewritten.append((start + offset, size, m.frame(b"d", masked) if masked else b""))

    def start_lookup(self, job: tuple[str, Any]) -> None:
        self.lookup = job
        if self.server is not None and not self.server.is_closing():
            self.server.pause_reading()
        asyncio.get_running_loop().create_task(self.run_lookup(job))

    async def run_lookup(self, job: tuple[str, Any]) -> None:
        masker = self.masker
        assert masker is not None
        try:
            result = await self.session.lookup(job)
        except Exception as exc:  # fail closed: no result leaves unmasked
            log.warning("session %s: %s lookup failed: %s", self.session.session_id, job[0], exc)
            self.fail_protocol("XX000", "Proctor cannot keep this result's evidence: the break-glass key is "
                                        "unavailable" if job[0] == "sealing" else
                               "Proctor cannot mask this result: the target's catalog is unavailable")
            return
        if self.done.done():
            return
        if job[0] != "sealing":
            masker.looked_up(job, result)
        self.lookup = None
        self.from_server(b"")
        if self.lookup is None and self.server is not None and not self.server.is_closing():
            self.server.resume_reading()

    def lineage_event(self, lineage: list[dict[str, Any]]) -> None:
        """Where a result's columns came from, in the recording: `proctor evidence reprocess` applies
        newer rules to an old session with the lineage the gateway saw then."""
        if self.evidence is not None and not self.evidence.closed:
            self.record(META, EVENT, orjson.dumps({"lineage": lineage}))

    def mask_event(self, plan: ResultPlan) -> None:
        """Each mask action of a result: which rule, column or detector, method, how many values."""
        statement = redact_statement(plan.statement) if plan.statement else None
        for (rule, target, method, path), count in plan.counts.items():
            column = None if target.startswith(("detector:", "strict:")) else target
            self.event("mask", rule=rule, statement=statement, rows=count,
                       details={"column": column, "target": target, "method": method, "path": path, "count": count})

    # guardrails -------------------------------------------------------------------------------
    def judge(self, msg_type: int, body: bytes) -> tuple[Verdict | None, bytes | None, str | None]:
        """(verdict when a rule had something to say, replacement frame when the statement stops,
        a Query's decoded text)."""
        guard = self.guard
        assert guard is not None
        text = None
        decided = self.decided.pop(bytes(body), None) if self.decided else None
        if decided is not None:  # a held statement coming back with its approval's outcome
            verdict = decided
            if msg_type == 0x51:
                text = m.parse_query(body)
        elif msg_type == 0x51:  # Query
            text = m.parse_query(body)
            verdict = guard.check(text) if self.standard_strings else guard.guardrails.evaluate(None, text)
        elif msg_type == 0x50:  # Parse
            query = m.parse_parse(body).query
            verdict = guard.check(query) if self.standard_strings else guard.guardrails.evaluate(None, query)
        else:  # FunctionCall by OID: nothing to parse, so it is judged as unparsable
            verdict = guard.guardrails.evaluate(None, f"<function call {m.parse_function_call(body)}>")
        if decided is None and verdict.action == ALLOW and not verdict.matched:
            return None, None, text
        if not stops(verdict):
            return verdict, None, text
        replacement = refused_parse(m.parse_parse(body).statement) if msg_type == 0x50 else refused_query()
        return verdict, replacement, text

    @staticmethod
    def statement_text(msg_type: int, body: bytes) -> str:
        if msg_type == 0x51:
            return m.parse_query(body)
        if msg_type == 0x50:
            return m.parse_parse(body).query
        return f"<function call {m.parse_function_call(body)}>"

    # approval holds ------------------------------------------------------------------------------
    def start_hold(self, hold: Hold) -> None:
        self.hold = hold
        if self.client is not None and not self.client.is_closing():
            self.client.pause_reading()
        hold.task = asyncio.get_running_loop().create_task(self.await_approval(hold))

    async def await_approval(self, hold: Hold) -> None:
        """Open an approval, tell the client where to decide, wait for the decision, resume."""
        session = self.session
        client = session.ctx.authority.client
        statement = redact_statement(hold.text)
        verdict = hold.verdict
        try:
            opened = await asyncio.to_thread(client.open_approval, session.grant_token, session.session_id,
                                             statement, verdict.rule, verdict.reason)
        except ControlPlaneError as exc:
            log.warning("approval could not be opened: %s", exc)
            self.resume(hold, dataclasses.replace(verdict, action=BLOCK, approval_id="none",
                                                  reason=f"approval could not be requested: {exc.detail or exc}"))
            return
        approval_id = str(opened["approval_id"])
        hold.approval_id = approval_id
        self.event("approval", status_detail="pending", approval_id=approval_id, rule=verdict.rule,
                   statement=statement, details={"decision": "requested", "reason": verdict.reason})
        notice = m.notice_response(
            f'Proctor: statement held for approval {approval_id} (rule "{verdict.rule}": {verdict.reason})',
            detail=f"expires at {opened.get('expires_at')}",
            hint=f"an approver decides with: proctor approvals approve {approval_id}")
        self.to_client(notice)
        # The control plane records the expiry; past it (and a grace) the gateway stops waiting anyway.
        give_up = time.time() + max(0.0, float(opened.get("expires_at") or time.time() + 3600) - time.time()) + 60
        delay = 0.25
        status: dict[str, Any] = {"status": "expired"}
        while time.time() < give_up:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 3.0)
            try:
                current = await asyncio.to_thread(client.approval, approval_id)
            except ControlPlaneError as exc:
                log.warning("approval %s status unavailable: %s", approval_id, exc)
                continue
            if current.get("status") != "pending":
                status = current
                break
        outcome = str(status["status"])
        decisions = status.get("decisions") or []
        deciding = next((d for d in reversed(decisions) if d.get("decision") in ("approve", "deny")), {})
        who, comment = deciding.get("approver", "?"), deciding.get("comment") or ""
        self.event("approval", status=STATUS_SUCCESS if outcome == "approved" else STATUS_FAILURE,
                   status_detail=outcome, approval_id=approval_id, rule=verdict.rule, statement=statement,
                   details={"decision": outcome, "decisions": decisions})
        if outcome == "approved":
            final = dataclasses.replace(verdict, action=ALLOW, approval_id=approval_id,
                                        reason=f"approved by {', '.join(d.get('approver', '?') for d in decisions)}")
        elif outcome == "denied":
            final = dataclasses.replace(verdict, action=BLOCK, approval_id=approval_id,
                                        reason=f"denied by {who}" + (f": {comment}" if comment else ""))
        else:
            final = dataclasses.replace(verdict, action=BLOCK, approval_id=approval_id, reason="approval expired")
        self.resume(hold, final)

    def resume(self, hold: Hold, outcome: Verdict) -> None:
        if self.hold is not hold or self.done.done():
            return
        self.hold = None
        self.decided[hold.message[5:]] = outcome
        self.from_client(hold.buffer)
        if self.client is not None and not self.client.is_closing() and self.hold is None:
            self.client.resume_reading()

    def cancel_hold(self) -> bool:
        hold = self.hold
        if hold is None:
            return False
        if hold.task is not None:
            hold.task.cancel()
        self.resume(hold, dataclasses.replace(hold.verdict, action=BLOCK, approval_id=hold.approval_id or "none",
                                              reason="canceling statement due to user request"))
        return True

    def event(self, activity: str, **fields: Any) -> None:
        if self.evidence is not None and not self.evidence.closed:
            self.evidence.add_event(self.session.info.event(activity, **fields))

    def to_client(self, payload: bytes) -> None:
        """Something the gateway itself says to the client (between whole frames, always)."""
        if self.client is not None and not self.client.is_closing():
            self.record(FROM_GATEWAY, WIRE, payload)
            self.client.write(payload)

    def parameter_status(self, body: bytes) -> None:
        name, value = m.parse_parameter_status(body)
        if name == "standard_conforming_strings":
            # With backslash escapes in plain strings the gateway's parser would read statements
            # differently from the server: every statement then counts as unparsable.
            self.standard_strings = value == "on"

    # control ------------------------------------------------------------------------------------
    def pause_reading(self, from_client: bool) -> None:
        transport = self.client if from_client else self.server
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self, from_client: bool) -> None:
        transport = self.client if from_client else self.server
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def fail_protocol(self, code: str, message: str) -> None:
        metrics.ERRORS.labels("protocol").inc()
        self.terminate(m.error_response(code, message, severity="FATAL"))

    def terminate(self, payload: bytes) -> None:
        if self.client is None:
            self.pending_terminate = payload
            return
        if self.done.done():
            return
        if self.fast is not None:  # the C data path says it, records it and ends the session
            self.fast[0].terminate(self.fast[1], payload)
            return
        if self.evidence is not None and not self.evidence.closed:
            self.evidence.record(FROM_GATEWAY, payload)
        with contextlib.suppress(Exception):
            self.client.write(payload)
        self.finish()

    def terminate_fast_failure(self) -> None:
        self.terminate(m.error_response("XX000", "internal gateway error", severity="FATAL"))

    def close_backend(self) -> None:
        if self.fast is not None:  # the C data path still holds the connections: it closes the session
            self.terminate(m.error_response("57P01", "terminating connection: the Proctor gateway is shutting down",
                                            severity="FATAL"))
            return
        if self.server is not None and not self.server.is_closing():
            with contextlib.suppress(Exception):
                self.server.write(m.terminate())
            self.server.close()

    def finish(self) -> None:
        if self.done.done():
            return
        if self.hold is not None and self.hold.task is not None:
            self.hold.task.cancel()
        self.done.set_result(None)
        self.close_backend()
        if self.client is not None:
            self.client.close()


@dataclasses.dataclass
class Hold:
    """A statement held until its approval is decided, with the client bytes that followed it."""

    buffer: bytes
    message: bytes  # the held frame itself
    verdict: Verdict
    text: str
    approval_id: str | None = None
    task: asyncio.Task[None] | None = None


def _replace_frames(chunk: bytes, replacements: list[tuple[int, int, bytes]]) -> bytes:
    """`chunk` with the frames at (offset, size) replaced, in order."""
    parts: list[bytes] = []
    pos = 0
    for offset, size, replacement in replacements:
        parts += [chunk[pos:offset], replacement]
        pos = offset + size
    parts.append(chunk[pos:])
    return b"".join(parts)


def _redacted(chunk: bytes, events: list[tuple[int, int, int, int]]) -> bytes:
    """The chunk as recorded: Query/Parse texts and text-format Bind values with secrets replaced."""
    parts: list[bytes] = []
    pos = 0
    for msg_type, offset, size, _ in events:
        if msg_type not in REDACTABLE:
            continue
        body = chunk[offset + 5:offset + size]
        parts.append(chunk[pos:offset])
        if msg_type == 0x51:
            parts.append(m.query(redact_statement(m.parse_query(body))))
        elif msg_type == 0x42:
            bound = m.parse_bind(body)
            values = tuple(
                redact_conninfo(v.decode("utf-8", errors="replace")).encode()
                if v is not None and bound.param_format(i) == 0 and might_hold_secret(v) else v
                for i, v in enumerate(bound.params))
            parts.append(m.bind(dataclasses.replace(bound, params=values)))
        else:
            parsed = m.parse_parse(body)
            rebuilt = (m.cstring(parsed.statement) + m.cstring(redact_statement(parsed.query))
                       + struct.pack("!h", len(parsed.param_types))
                       + b"".join(struct.pack("!I", oid) for oid in parsed.param_types))
            parts.append(m.frame(b"P", rebuilt))
        pos = offset + size
    parts.append(chunk[pos:])
    return b"".join(parts)
