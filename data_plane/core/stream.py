"""A connection read and written by coroutines while a session starts (TLS, startup, login),
until a relay takes its transport over.

It does for the gateway what asyncio's StreamReader, StreamWriter and StreamReaderProtocol do
together, as one small object: exact reads, writes with flow control, a TLS upgrade; and, for a
held stream, a look at the peer's first byte before anything is read (a client that opens with
its TLS handshake needs that byte left for OpenSSL). The difference that matters is what stays
behind once the relay calls `transport.set_protocol`: asyncio's trio of objects (buffers,
futures, a deque of drain waiters, ~5 KiB a connection) would live as long as the session,
because dropping the StreamWriter closes its transport; this object holds nothing the session
still needs, and nothing closes anything behind the relay's back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

READ_LIMIT = 1 << 16  # reading pauses while this much is buffered and unread
# More than a client sends before it is answered (a TLS ClientHello, a startup packet), and small
# enough that raising the low-water mark leaves the socket's receive buffer as it was.
HOLD_LOWAT = 1 << 15


class Stream(asyncio.Protocol):
    __slots__ = ("_buffer", "_drain_waiter", "_eof", "_error", "_hold", "_lost", "_read_paused", "_waiter",
                 "_wanted", "_write_paused", "on_connected", "raw", "transport")

    def __init__(self, on_connected: Callable[[Stream], None] | None = None, *, hold: bool = False) -> None:
        self.on_connected = on_connected  # a server's stream: called once the connection is made
        self._hold = hold  # read nothing until `peek` has seen the first byte
        self.transport: asyncio.Transport | None = None
        self.raw: asyncio.Transport | None = None  # the TCP transport under TLS, once start_tls ran
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._eof = False
        self._error: BaseException | None = None
        self._lost = False
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._hold:
            # asyncio honours a pause from here; uvloop starts reading once this returns regardless.
            # Until `peek` pauses for good, a low-water mark above what a client sends unanswered
            # keeps the socket from looking readable (a FIN still does).
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, HOLD_LOWAT)
            transport.pause_reading()  # type: ignore[attr-defined]
        if self.on_connected is not None:
            on_connected, self.on_connected = self.on_connected, None
            on_connected(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is not None and len(self._buffer) >= self._wanted:
            self._wake()
        if len(self._buffer) > READ_LIMIT and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # nothing more to read during a startup: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("Connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # reading -----------------------------------------------------------------------------------
    async def readexactly(self, n: int) -> bytes:
        """n bytes; IncompleteReadError if the peer closes first, its error if the connection broke."""
        buffer = self._buffer
        while len(buffer) < n:
            if self._error is not None:
                raise self._error
            if self._eof:
                partial = bytes(buffer)
                buffer.clear()
                raise asyncio.IncompleteReadError(partial, n)
            if self._read_paused and self.transport is not None:
                self._read_paused = False
                self.transport.resume_reading()
            self._wanted = n
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(buffer[:n])
        del buffer[:n]
        return data

    async def peek(self) -> bytes:
        """The first byte the peer sent, left unread for whoever reads next (this stream once
        `resume`d, or TLS); b"" if the peer closed without sending anything. For a held stream."""
        transport = self.transport
        assert transport is not None and self._hold
        if self._error is not None:
            raise self._error
        if self._lost or transport.is_closing():
            return bytes(self._buffer[:1])
        transport.pause_reading()
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        if self._buffer or self._eof:  # read before the hold began: a FIN makes a socket readable
            return bytes(self._buffer[:1])
        # The loop watches no fd its transports own (uvloop refuses): watch a duplicate, peek through it.
        watcher = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            with contextlib.suppress(BlockingIOError):  # most clients have spoken by now
                return watcher.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            loop = asyncio.get_running_loop()
            readable = loop.create_future()
            loop.add_reader(watcher, _set_once, readable)
            try:
                await readable
            finally:
                loop.remove_reader(watcher)
            return watcher.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        finally:
            watcher.close()

    def resume(self) -> None:
        """Read again, after `peek`."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def buffered(self) -> int:
        """How many bytes were read and not consumed."""
        return len(self._buffer)

    def take_buffered(self) -> bytes:
        """What was read and not consumed: it belongs to whoever takes the transport over."""
        data = bytes(self._buffer)
        self._buffer = bytearray()
        return data

    # writing -----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self._error is not None:
            raise self._error
        assert self.transport is not None
        if self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost run, as StreamWriter.drain does
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if self._write_paused:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool = False,
                        server_hostname: str | None = None) -> None:
        assert self.transport is not None
        await self.drain()
        self.raw = self.transport
        self.transport = await asyncio.get_running_loop().start_tls(  # type: ignore[assignment]
            self.transport, self, context, server_side=server_side, server_hostname=server_hostname)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport is not None else default

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
