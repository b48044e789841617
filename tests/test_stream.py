"""The startup-phase connection: exact reads across chunks, the peer's EOF and errors as a
StreamReader reports them, writes that wait out a full buffer, and what is left unread handed over
to whoever takes the transport next — driven here through its protocol callbacks, then over real
sockets with TLS."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from data_plane.core.stream import READ_LIMIT, Stream
from proctor.dev.tls import make_ca_and_server_cert


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.reading = True
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5432) if name == "peername" else default


def connected() -> tuple[Stream, Transport]:
    stream, transport = Stream(), Transport()
    stream.connection_made(transport)  # type: ignore[arg-type]
    return stream, transport


async def test_exact_reads_span_chunks_and_leave_the_rest_for_whoever_takes_over() -> None:
    stream, _ = connected()
    read = asyncio.ensure_future(stream.readexactly(6))
    stream.data_received(b"abc")
    await asyncio.sleep(0)
    assert not read.done()
    stream.data_received(b"defgh")
    assert await read == b"abcdef"
    assert stream.take_buffered() == b"gh"
    assert stream.take_buffered() == b""


async def test_eof_before_enough_bytes_is_an_incomplete_read_and_an_error_is_raised_as_is() -> None:
    stream, _ = connected()
    stream.data_received(b"ab")
    stream.eof_received()
    with pytest.raises(asyncio.IncompleteReadError) as caught:
        await stream.readexactly(4)
    assert caught.value.partial == b"ab"
    broken, _ = connected()
    broken.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(ConnectionResetError, match="reset by peer"):
        await broken.readexactly(1)


async def test_reading_pauses_while_too_much_is_unread_and_resumes_when_it_is_wanted() -> None:
    stream, transport = connected()
    stream.data_received(b"x" * (READ_LIMIT + 1))
    assert not transport.reading
    await stream.readexactly(READ_LIMIT + 1)
    read = asyncio.ensure_future(stream.readexactly(1))
    await asyncio.sleep(0)
    assert transport.reading  # waiting for more: reading is on again
    stream.data_received(b"y")
    assert await read == b"y"


async def test_drain_waits_while_the_transport_is_full_and_fails_once_the_connection_is_gone() -> None:
    stream, transport = connected()
    stream.write(b"hello")
    assert transport.written == b"hello"
    await stream.drain()  # not paused: returns at once
    stream.pause_writing()
    drained = asyncio.ensure_future(stream.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    stream.resume_writing()
    await drained
    stream.pause_writing()
    drained = asyncio.ensure_future(stream.drain())
    await asyncio.sleep(0)
    stream.connection_lost(None)
    with pytest.raises(ConnectionResetError):
        await drained


async def test_a_server_stream_upgrades_to_tls_and_the_relay_can_take_its_transport(tmp_path: Path) -> None:
    tls = make_ca_and_server_cert(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls["cert_file"], tls["key_file"])
    accepted: asyncio.Queue[Stream] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Stream(on_connected=accepted.put_nowait), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = await accepted.get()
        assert stream.get_extra_info("peername")[0] == "127.0.0.1"
        writer.write(b"TLS?")
        assert await stream.readexactly(4) == b"TLS?"
        stream.write(b"S")
        assert await reader.readexactly(1) == b"S"
        client_context = ssl.create_default_context(cafile=tls["ca_file"])
        upgrade = asyncio.ensure_future(writer.start_tls(client_context, server_hostname="localhost"))
        await stream.start_tls(server_context, server_side=True)
        await upgrade
        writer.write(b"over tls, and some more")
        assert await stream.readexactly(8) == b"over tls"
        await asyncio.sleep(0.05)
        assert stream.take_buffered() == b", and some more"
        assert stream.transport is not None and stream.transport.get_extra_info("sslcontext") is server_context
        writer.close()
    finally:
        server.close()


# A held stream (the gateway's client connections): nothing is read until `peek` has seen the first
# byte, on either event loop, so a direct TLS handshake reaches OpenSSL whole.


def on_loop(kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def held_server() -> tuple[asyncio.Server, int, asyncio.Queue[Stream]]:
    accepted: asyncio.Queue[Stream] = asyncio.Queue()
    server = await asyncio.get_running_loop().create_server(
        lambda: Stream(on_connected=accepted.put_nowait, hold=True), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_held_stream_reads_nothing_before_peek_and_the_peeked_byte_stays_unread(loop: str) -> None:
    async def main() -> None:
        server, port, accepted = await held_server()
        # Connected and sent before the loop runs again: uvloop reads right after connection_made.
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"hello")
        stream = await accepted.get()
        await asyncio.sleep(0.05)
        assert stream.buffered == 0
        assert await stream.peek() == b"h"
        await asyncio.sleep(0.05)
        assert stream.buffered == 0
        stream.resume()
        assert await stream.readexactly(5) == b"hello"
        client.sendall(b" again")
        assert await stream.readexactly(6) == b" again"  # reads as usual: no low-water mark left behind
        client.close()
        server.close()

    on_loop(loop, main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_held_stream_hands_a_direct_tls_handshake_to_start_tls(loop: str, tmp_path: Path) -> None:
    tls = make_ca_and_server_cert(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls["cert_file"], tls["key_file"])
    server_context.set_alpn_protocols(["postgresql"])
    client_context = ssl.create_default_context(cafile=tls["ca_file"])
    client_context.set_alpn_protocols(["postgresql"])

    async def main() -> None:
        server, port, accepted = await held_server()
        client = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port, ssl=client_context,
                                                               server_hostname="localhost"))
        stream = await accepted.get()
        assert await stream.peek() == b"\x16"
        await stream.start_tls(server_context, server_side=True)
        assert stream.get_extra_info("ssl_object").selected_alpn_protocol() == "postgresql"
        _, writer = await client
        writer.write(b"startup")
        assert await stream.readexactly(7) == b"startup"
        writer.close()
        server.close()

    on_loop(loop, main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_peek_waits_out_a_silent_peer_and_sees_one_that_leaves_without_a_word(loop: str) -> None:
    async def main() -> None:
        server, port, accepted = await held_server()
        client = socket.create_connection(("127.0.0.1", port))
        stream = await accepted.get()
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.peek(), 0.2)
        # the watcher closed with the wait (other threads of the test process, a relay engine's syncer from an
        # earlier test, may close descriptors meanwhile: a leak is a count that grew)
        assert len(os.listdir("/proc/self/fd")) <= fds
        peek = asyncio.ensure_future(stream.peek())
        await asyncio.sleep(0.05)
        client.close()
        assert await asyncio.wait_for(peek, 5) == b""
        gone = socket.create_connection(("127.0.0.1", port))
        gone.close()  # before the stream could hold it, even
        assert await asyncio.wait_for((await accepted.get()).peek(), 5) == b""
        server.close()

    on_loop(loop, main)
