"""The gateway's backend login fails as BackendUnavailable (the session answers 08006), not as an
internal error, when the backend's TLS certificate is untrusted or the backend stalls."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from data_plane.core.credentials import Credential
from data_plane.postgres import backend
from proctor.dev.tls import make_ca_and_server_cert

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _credential(port: int, backend_tls: str) -> Credential:
    return Credential(username="app", password="secret", host="127.0.0.1", port=port, database="app",
                      backend_tls=backend_tls, version_id=None)


async def _serve(handler: Handler) -> asyncio.Server:
    return await asyncio.start_server(handler, "127.0.0.1", 0)


def test_untrusted_backend_certificate_is_backend_unavailable(tmp_path: Path) -> None:
    served = make_ca_and_server_cert(tmp_path / "backend")
    trusted = make_ca_and_server_cert(tmp_path / "other")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(served["cert_file"], served["key_file"])

    async def accept_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # SSLRequest
        writer.write(b"S")
        await writer.drain()
        with contextlib.suppress(ssl.SSLError, OSError):  # the client aborts the handshake
            await writer.start_tls(server_tls)
        writer.close()

    async def scenario() -> None:
        server = await _serve(accept_tls)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(backend.BackendUnavailable, match="backend TLS certificate verify failed"):
                await backend.connect(_credential(port, "verify-full"), "app", {}, timeout=5,
                                      ca_file=trusted["ca_file"])

    asyncio.run(scenario())


def test_backend_that_never_answers_the_startup_is_backend_unavailable() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    async def scenario() -> None:
        server = await _serve(stall)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(backend.BackendUnavailable, match="broke off the startup: TimeoutError"):
                await backend.connect(_credential(port, "disable"), "app", {}, timeout=0.3)

    asyncio.run(scenario())
