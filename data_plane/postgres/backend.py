"""The gateway's own connection to the PostgreSQL backend: TLS as the target asks, startup as
the backend role, and authentication with the injected credential (SCRAM-SHA-256, MD5 or
cleartext — whatever the server requests)."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from data_plane.core.credentials import Credential
from data_plane.core.stream import Stream
from data_plane.postgres import messages as m
from data_plane.postgres.auth import SCRAM_SHA_256, BackendAuthError, ScramClient, md5_password

_HEADER = struct.Struct("!ci")
# Client startup parameters relayed to the backend; user, database and replication are the gateway's.
RELAYED_PARAMETERS = ("application_name", "client_encoding", "DateStyle", "TimeZone", "IntervalStyle",
                      "extra_float_digits", "options", "search_path", "standard_conforming_strings",
                      "datestyle", "timezone", "intervalstyle")


class BackendRefused(Exception):
    """The backend answered the startup with an ErrorResponse."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        super().__init__(fields.get("M", "backend refused the connection"))
        self.fields = dict(fields)

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "08006")

    @property
    def authentication_failed(self) -> bool:
        return self.sqlstate in ("28P01", "28000")


class BackendUnavailable(Exception):
    pass


@dataclass
class BackendConnection:
    stream: Stream
    host: str
    port: int
    tls: bool
    pid: int = 0
    secret: int = 0
    # ParameterStatus and NoticeResponse frames the backend sent after AuthenticationOk, relayed as is.
    startup_frames: list[bytes] = field(default_factory=list)
    transaction_status: bytes = b"I"


async def read_message(reader: Stream, max_size: int) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    msg_type, length = _HEADER.unpack(header)
    if length < 4 or length > max_size:
        raise m.ProtocolViolation(f"invalid message length {length}")
    return msg_type, await reader.readexactly(length - 4)


def backend_tls_context(mode: str, ca_file: str | None) -> ssl.SSLContext:
    if mode == "verify-full":
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # `require`/`prefer` encrypt without authenticating the server, as libpq's modes of those names do.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def connect(credential: Credential, database: str | None, client_params: Mapping[str, str], *,
                  timeout: float = 10.0, max_message: int = 1 << 26, ca_file: str | None = None) -> BackendConnection:
    try:
        _, stream = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(Stream, credential.host, credential.port), timeout)
    except (OSError, TimeoutError) as exc:
        raise BackendUnavailable(f"cannot reach the target's database: {type(exc).__name__}") from exc
    connection = BackendConnection(stream, credential.host, credential.port, tls=False)
    try:
        try:
            await asyncio.wait_for(_startup(connection, credential, database, client_params, max_message, ca_file),
                                   timeout)
        except ssl.SSLCertVerificationError as exc:
            raise BackendUnavailable(f"backend TLS certificate verify failed: {exc.verify_message}") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:  # TLS handshake, reset, startup timeout
            raise BackendUnavailable(f"the target's database broke off the startup: {type(exc).__name__}") from exc
    except BaseException:
        stream.close()
        raise
    return connection


async def _startup(conn: BackendConnection, credential: Credential, database: str | None,
                   client_params: Mapping[str, str], max_message: int, ca_file: str | None) -> None:
    mode = credential.backend_tls
    stream = conn.stream
    if mode != "disable":
        stream.write(m.ssl_request())
        await stream.drain()
        answer = await stream.readexactly(1)
        if answer == b"S":
            await stream.start_tls(backend_tls_context(mode, ca_file), server_hostname=credential.host)
            conn.tls = True
        elif mode in ("require", "verify-full"):
            raise BackendUnavailable("the target's database does not offer TLS")
    params = {k: v for k, v in client_params.items() if k in RELAYED_PARAMETERS}
    params.update(user=credential.username, database=database or credential.database or credential.username)
    stream.write(m.startup_message(params))
    await stream.drain()
    scram: ScramClient | None = None
    while True:
        msg_type, body = await read_message(stream, max_message)
        if msg_type == b"R":
            code, data = m.parse_authentication(body)
            if code == m.AUTH_OK:
                break
            if code == m.AUTH_CLEARTEXT:
                if not conn.tls and mode != "disable":
                    raise BackendAuthError("backend asks for a cleartext password without TLS")
                stream.write(m.password_message(credential.password))
            elif code == m.AUTH_MD5:
                stream.write(m.password_message(md5_password(credential.username, credential.password, data)))
            elif code == m.AUTH_SASL:
                mechanisms = [x.decode() for x in data.split(b"\x00") if x]
                if SCRAM_SHA_256 not in mechanisms:
                    raise BackendAuthError(f"no supported SASL mechanism in {mechanisms}")
                scram = ScramClient(credential.password)
                stream.write(m.sasl_initial_response(SCRAM_SHA_256, scram.client_first()))
            elif code == m.AUTH_SASL_CONTINUE and scram is not None:
                stream.write(m.sasl_response(scram.client_final(data)))
            elif code == m.AUTH_SASL_FINAL and scram is not None:
                scram.verify_server_final(data)
            else:
                raise BackendAuthError(f"unsupported authentication request {code}")
            await stream.drain()
        elif msg_type == b"E":
            raise BackendRefused(m.error_fields(body))
        elif msg_type != b"N":
            raise m.ProtocolViolation(f"unexpected message {msg_type!r} during backend authentication")
    while True:
        msg_type, body = await read_message(stream, max_message)
        if msg_type == b"K":
            conn.pid, conn.secret = m.parse_backend_key_data(body)
        elif msg_type == b"Z":
            conn.transaction_status = body[:1] or b"I"
            return
        elif msg_type == b"E":
            raise BackendRefused(m.error_fields(body))
        elif msg_type in (b"S", b"N"):
            conn.startup_frames.append(m.frame(msg_type, body))
        else:
            raise m.ProtocolViolation(f"unexpected message {msg_type!r} after backend authentication")


async def send_cancel(host: str, port: int, pid: int, secret: int, *, timeout: float = 5.0) -> None:
    """Forward a cancel to the backend the way libpq does: a fresh connection, one packet."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(m.cancel_request(pid, secret))
        await writer.drain()
        await asyncio.wait_for(reader.read(1), timeout)
    finally:
        writer.close()
