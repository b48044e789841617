"""PostgreSQL 17 direct TLS (`sslnegotiation=direct`) on the gateway's client listener: clients that
open with their TLS handshake instead of an SSLRequest, the ALPN protocol PostgreSQL requires of
them, and connections that say nothing, or nonsense, before a word of PostgreSQL."""

from __future__ import annotations

import asyncio
import decimal
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from data_plane.postgres import messages as m
from tests.stack import Stack, stop_process_group
from tests.test_postgres_fastpath import fast_path_counts, no_guardrails_token
from tests.test_postgres_gateway import assert_cancel_ends_a_sleep, events_for_run

pytestmark = pytest.mark.integration

WITHOUT_ALPN = "received direct SSL connection request without ALPN protocol negotiation extension"


class FirstBytes:
    """A TCP forwarder in front of a gateway that notes the first byte of each connection: the
    proof that a client opened with its TLS handshake (0x16) rather than an SSLRequest."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.seen: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def __enter__(self) -> FirstBytes:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            first = client.recv(1)
            self.seen.append(first)
            server.sendall(first)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything until the peer closes (an error counts as closed)."""
    chunks = []
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


def _direct_tls(port: int, ca_file: str, alpn: list[str] | None) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=ca_file)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                               server_hostname="127.0.0.1")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_psycopg_with_sslnegotiation_direct_is_recorded_as_tls_and_relayed_by_the_c_data_path(stack: Stack) -> None:
    run = f"direct-{uuid.uuid4().hex[:8]}"
    grant = stack.grant(no_guardrails_token(stack, run))
    before = fast_path_counts(stack)
    with FirstBytes(stack.gateway["port"]) as proxy:
        info = stack.conninfo(grant, port=proxy.port, sslnegotiation="direct")
        with psycopg.connect(**info, autocommit=True) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT name FROM customers WHERE id = 1").fetchone() == ("Ada Lovelace",)
            assert conn.execute("SELECT %s::int + 1, %s::text", (41, "é ✓")).fetchone() == (42, "é ✓")
            assert conn.execute("SELECT %s::int * 2", (21,), binary=True).fetchone() == (42,)
        assert proxy.seen == [m.TLS_HANDSHAKE]
    rows = events_for_run(stack, run, at_least=3)
    assert [(r["statement"], r["status"]) for r in rows] == [
        ("SELECT name FROM customers WHERE id = 1", "Success"),
        ("SELECT $1::int + 1, $2::text", "Success"),
        ("SELECT $1::int * 2", "Success"),
    ]
    assert json.loads(rows[1]["details"])["parameters"] == ["41", "é ✓"]
    connect = events_for_run(stack, run, at_least=1, activity="connect")
    assert json.loads(connect[0]["details"])["client_tls"] is True
    # Taken over by the C data path as a session that sent an SSLRequest is, and ended there.
    deadline = time.monotonic() + 10
    while (after := fast_path_counts(stack)).get("ended", 0) <= before.get("ended", 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after.get("adopted", 0) == before.get("adopted", 0) + 1
    assert after.get("ended", 0) == before.get("ended", 0) + 1
    assert after.get("ejected", 0) == before.get("ejected", 0)


def test_a_cancel_request_over_direct_tls_reaches_the_backend(stack: Stack) -> None:
    with FirstBytes(stack.gateway["port"]) as proxy, \
            psycopg.connect(**stack.conninfo(stack.grant(), port=proxy.port, sslnegotiation="direct"),
                            autocommit=True) as conn:
        assert_cancel_ends_a_sleep(conn)
        # libpq's cancel connection negotiates as the session did: direct TLS, then the CancelRequest.
        assert proxy.seen == [m.TLS_HANDSHAKE, m.TLS_HANDSHAKE]


def test_asyncpg_direct_tls_returns_binary_results(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id=f"asyncpg-direct-{uuid.uuid4().hex[:8]}"))
    context = stack.ssl_context()
    context.set_alpn_protocols([m.ALPN_PROTOCOL])  # asyncpg sets ALPN only on contexts it makes itself

    async def fetch(port: int) -> asyncpg.Record:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=grant["grant_id"], password=grant["token"],
                                     database="app", ssl=context, direct_tls=True)
        try:
            return await conn.fetchrow("SELECT $1::int4 AS i, 2.5::numeric AS n, '\\xdeadbeef'::bytea AS b, "
                                       "ARRAY[1, 2, 3] AS a, gen_random_uuid() AS u", 7)
        finally:
            await conn.close()

    with FirstBytes(stack.gateway["port"]) as proxy:
        row = asyncio.run(fetch(proxy.port))
        assert proxy.seen == [m.TLS_HANDSHAKE]
    assert (row["i"], row["n"], row["b"], row["a"]) == (7, decimal.Decimal("2.5"), b"\xde\xad\xbe\xef", [1, 2, 3])
    assert isinstance(row["u"], uuid.UUID)


@pytest.mark.parametrize("alpn", [None, ["h2", "http/1.1"]], ids=["no-alpn", "other-alpn"])
def test_direct_tls_without_the_postgresql_alpn_gets_08p01_and_the_gateway_serves_on(stack: Stack,
                                                                                     alpn: list[str] | None) -> None:
    tls = _direct_tls(stack.gateway["port"], stack.gateway["ca_file"], alpn)
    assert tls.selected_alpn_protocol() is None
    frames = list(m.iter_frames(_read_all(tls)))  # then the gateway closes the connection
    tls.close()
    assert [msg_type for msg_type, _ in frames] == [b"E"]
    fields = m.error_fields(frames[0][1])
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "08P01", WITHOUT_ALPN)
    with psycopg.connect(**stack.conninfo(stack.grant()), autocommit=True) as conn:
        assert conn.execute("SELECT 'still serving'").fetchone() == ("still serving",)


def test_asyncpg_with_a_context_without_alpn_is_refused_like_postgresql_refuses_it(stack: Stack) -> None:
    grant = stack.grant()

    async def connect() -> None:
        await asyncpg.connect(host="127.0.0.1", port=stack.gateway["port"], user=grant["grant_id"],
                              password=grant["token"], database="app", ssl=stack.ssl_context(), direct_tls=True)

    with pytest.raises(asyncpg.PostgresError, match="without ALPN") as refused:
        asyncio.run(connect())
    assert refused.value.sqlstate == "08P01"


def test_a_direct_tls_client_may_still_send_an_sslrequest_inside_tls_and_gets_n(stack: Stack) -> None:
    grant = stack.grant()
    tls = _direct_tls(stack.gateway["port"], stack.gateway["ca_file"], [m.ALPN_PROTOCOL])
    tls.sendall(m.ssl_request())
    assert tls.recv(1) == b"N"
    tls.sendall(m.startup_message({"user": grant["grant_id"], "database": "app"}))
    assert tls.recv(9) == m.authentication(m.AUTH_CLEARTEXT)
    tls.sendall(m.password_message(grant["token"]))
    tls.sendall(m.query("SELECT 'direct and raw'"))
    tls.sendall(m.terminate())
    assert b"direct and raw" in _read_all(tls)


@pytest.fixture(scope="module")
def own_gateway(stack: Stack) -> Iterator[tuple[Any, dict[str, Any], int]]:
    """A gateway of this module's own: its log and its open files are these tests' alone."""
    proc, info, port = stack.extra_gateway("direct-tls-gateway")
    try:
        yield proc, info, port
    finally:
        stop_process_group(proc)


def test_silent_closed_and_garbage_connections_end_quietly_and_leak_nothing(
        stack: Stack, own_gateway: tuple[Any, dict[str, Any], int]) -> None:
    proc, info, port = own_gateway
    log = Path(info["log"])
    log_start = log.stat().st_size
    conninfo = stack.conninfo(stack.grant(), port=port, sslrootcert=info["ca_file"], sslnegotiation="direct")
    with psycopg.connect(**conninfo, autocommit=True) as bystander:
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        time.sleep(0.5)
        fds = _open_fds(proc.pid)
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        for _ in range(10):  # connected and gone at once
            socket.create_connection(("127.0.0.1", port)).close()
        # Half a handshake record; whole records that hold no handshake; a record longer than TLS allows.
        for garbage in (b"\x16", b"\x16\x03\x01\x00\x05hello", b"\x16\x03\x01\x0b\xb8" + b"\xfe" * 3000,
                        b"\x16\x03\x03\xff\xff" + b"x" * 100):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            raw.sendall(garbage)
            if garbage == b"\x16":
                raw.close()  # half a handshake, then gone
                continue
            _read_all(raw)  # the gateway ends the connection (after a TLS alert, maybe)
            raw.close()
        assert bystander.execute("SELECT 'still serving'").fetchone() == ("still serving",)
        with psycopg.connect(**conninfo, autocommit=True) as newcomer:
            assert newcomer.execute("SELECT 'served while they wait'").fetchone() == ("served while they wait",)
        for sock in silent:
            sock.close()
        deadline = time.monotonic() + 10
        while _open_fds(proc.pid) > fds and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _open_fds(proc.pid) <= fds
    written = log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in written and " ERROR " not in written, written


def test_without_a_certificate_a_direct_tls_client_is_closed_on_and_plaintext_still_works(stack: Stack) -> None:
    proc, info, port = stack.extra_gateway("no-tls-gateway", PROCTOR_TLS_CERT="", PROCTOR_TLS_KEY="",
                                           PROCTOR_PG_REQUIRE_TLS="false")
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        context = ssl.create_default_context(cafile=stack.gateway["ca_file"])
        context.set_alpn_protocols([m.ALPN_PROTOCOL])
        with pytest.raises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
        raw.close()
        conninfo = stack.conninfo(stack.grant(), port=port, sslmode="disable")
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            assert conn.execute("SELECT 'in the clear'").fetchone() == ("in the clear",)
        assert "a direct TLS connection and no TLS certificate" in Path(info["log"]).read_text()
    finally:
        stop_process_group(proc)
