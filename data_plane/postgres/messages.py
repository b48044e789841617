"""PostgreSQL frontend/backend protocol 3.0, sans I/O: bytes in, typed values out, and back.

Message type bytes depend on direction (`D` is Describe from the client and DataRow from the
server), so decoders are named for the side that sends the message."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
MAX_STARTUP_PACKET = 10_000  # what PostgreSQL itself accepts for a startup packet
# PostgreSQL 17 direct TLS (sslnegotiation=direct): the client opens with a TLS handshake record,
# a first byte no startup packet starts with, and must negotiate this ALPN protocol.
TLS_HANDSHAKE = b"\x16"
ALPN_PROTOCOL = "postgresql"

_INT32 = struct.Struct("!i")
_INT16 = struct.Struct("!h")
_UNPACK_INT32 = _INT32.unpack_from
_UNPACK_INT16 = _INT16.unpack_from
_HEADER = struct.Struct("!ci")

# Authentication request codes (server 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


class ProtocolViolation(Exception):
    """The peer sent something that is not valid protocol; answered with SQLSTATE 08P01."""

    sqlstate = "08P01"


# ------------------------------------------------------------------------------------------------
# framing
# ------------------------------------------------------------------------------------------------


def frame(msg_type: bytes, body: bytes = b"") -> bytes:
    return msg_type + _INT32.pack(len(body) + 4) + body


def cstring(value: str) -> bytes:
    return value.encode() + b"\x00"


class Reader:
    """Cursor over one message body."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = bytes(data)
        self.pos = 0

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ProtocolViolation("message truncated")
        (value,) = _INT32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise ProtocolViolation("message truncated")
        (value,) = _INT16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(value)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ProtocolViolation("message truncated")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def cstring(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise ProtocolViolation("unterminated string")
        value = self.data[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolViolation("message truncated")
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def rest(self) -> bytes:
        value = self.data[self.pos:]
        self.pos = len(self.data)
        return value


def iter_frames(data: bytes | bytearray | memoryview) -> Iterator[tuple[bytes, bytes]]:
    """(type, body) for each complete frame; for decoding recordings, not for the hot path."""
    pos, n = 0, len(data)
    while pos + 5 <= n:
        msg_type, length = _HEADER.unpack_from(data, pos)
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length}")
        end = pos + 1 + length
        if end > n:
            return
        yield msg_type, bytes(data[pos + 5:end])
        pos = end


# ------------------------------------------------------------------------------------------------
# startup phase (untyped messages)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartupMessage:
    protocol: int
    params: Mapping[str, str]


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Decode a whole startup-phase packet (its int32 length included)."""
    if len(packet) < 8:
        raise ProtocolViolation("startup packet too short")
    reader = Reader(packet)
    length = reader.int32()
    if length != len(packet):
        raise ProtocolViolation("startup packet length mismatch")
    code = reader.int32()
    if code == SSL_REQUEST_CODE:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if length != 16:
            raise ProtocolViolation("malformed cancel request")
        return CancelRequest(reader.int32(), reader.int32())
    if code >> 16 != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    params: dict[str, str] = {}
    while True:
        key = reader.cstring()
        if not key:
            break
        params[key] = reader.cstring()
    return StartupMessage(code, params)


def startup_message(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = _INT32.pack(protocol) + b"".join(cstring(k) + cstring(v) for k, v in params.items()) + b"\x00"
    return _INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return _INT32.pack(16) + _INT32.pack(CANCEL_REQUEST_CODE) + _INT32.pack(pid) + _INT32.pack(secret)


# ------------------------------------------------------------------------------------------------
# server → client
# ------------------------------------------------------------------------------------------------


def authentication(code: int, data: bytes = b"") -> bytes:
    return frame(b"R", _INT32.pack(code) + data)


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    reader = Reader(body)
    return reader.int32(), reader.rest()


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", cstring(name) + cstring(value))


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    reader = Reader(body)
    return reader.cstring(), reader.cstring()


def backend_key_data(pid: int, secret: int) -> bytes:
    return frame(b"K", _INT32.pack(pid) + _INT32.pack(secret))


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    reader = Reader(body)
    return reader.int32(), reader.int32()


def ready_for_query(status: bytes = b"I") -> bytes:
    return frame(b"Z", status)


# ErrorResponse/NoticeResponse field codes.
FIELD_SEVERITY = "S"
FIELD_SEVERITY_V = "V"
FIELD_CODE = "C"
FIELD_MESSAGE = "M"
FIELD_DETAIL = "D"
FIELD_HINT = "H"


def error_fields(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    reader = Reader(body)
    while True:
        code = reader.byte()
        if code == 0:
            return fields
        fields[chr(code)] = reader.cstring()


def _fields_message(msg_type: bytes, severity: str, code: str, message: str, detail: str | None,
                    hint: str | None) -> bytes:
    parts = [b"S" + cstring(severity), b"V" + cstring(severity), b"C" + cstring(code), b"M" + cstring(message)]
    if detail:
        parts.append(b"D" + cstring(detail))
    if hint:
        parts.append(b"H" + cstring(hint))
    return frame(msg_type, b"".join(parts) + b"\x00")


def error_response(code: str, message: str, *, severity: str = "ERROR", detail: str | None = None,
                   hint: str | None = None) -> bytes:
    return _fields_message(b"E", severity, code, message, detail, hint)


def notice_response(message: str, *, code: str = "00000", severity: str = "NOTICE", detail: str | None = None,
                    hint: str | None = None) -> bytes:
    return _fields_message(b"N", severity, code, message, detail, hint)


def parse_command_complete(body: bytes) -> str:
    if body[-1:] == b"\x00" and b"\x00" not in body[:-1]:  # the usual, well-formed case, without a Reader
        return body[:-1].decode("utf-8", errors="replace")
    return Reader(body).cstring()


def rows_from_tag(tag: str) -> int | None:
    """Rows a command reported: `SELECT 5`, `INSERT 0 5`, `UPDATE 5`, `COPY 5`, `FETCH 5`…"""
    parts = tag.split()
    if len(parts) >= 2 and parts[-1].isdigit():
        return int(parts[-1])
    return None


@dataclass(frozen=True)
class FieldDescription:
    name: str
    table_oid: int
    column_attnum: int
    type_oid: int
    type_size: int
    type_modifier: int
    format_code: int


def parse_row_description(body: bytes) -> list[FieldDescription]:
    reader = Reader(body)
    count = reader.int16()
    fields = []
    for _ in range(count):
        name = reader.cstring()
        table_oid = reader.int32() & 0xFFFFFFFF
        attnum = reader.int16()
        type_oid = reader.int32() & 0xFFFFFFFF
        size = reader.int16()
        modifier = reader.int32()
        fmt = reader.int16()
        fields.append(FieldDescription(name, table_oid, attnum, type_oid, size, modifier, fmt))
    return fields


def parse_parameter_description(body: bytes) -> tuple[int, ...]:
    reader = Reader(body)
    return tuple(reader.int32() & 0xFFFFFFFF for _ in range(reader.int16()))


def parse_data_row(body: bytes) -> list[bytes | None]:
    reader = Reader(body)
    values: list[bytes | None] = []
    for _ in range(reader.int16()):
        length = reader.int32()
        values.append(None if length < 0 else reader.take(length))
    return values


def data_row(values: list[bytes | None]) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for value in values:
        parts.append(_INT32.pack(-1) if value is None else _INT32.pack(len(value)) + value)
    return frame(b"D", b"".join(parts))


# ------------------------------------------------------------------------------------------------
# client → server
# ------------------------------------------------------------------------------------------------


def password_message(password: str | bytes) -> bytes:
    raw = password.encode() if isinstance(password, str) else password
    return frame(b"p", raw + b"\x00")


def parse_password(body: bytes) -> str:
    return Reader(body).cstring()


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", cstring(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return frame(b"p", data)


def query(text: str) -> bytes:
    return frame(b"Q", cstring(text))


def terminate() -> bytes:
    return frame(b"X")


def parse_query(body: bytes) -> str:
    if body[-1:] == b"\x00" and b"\x00" not in body[:-1]:
        return body[:-1].decode("utf-8", errors="replace")
    return Reader(body).cstring()


@dataclass(frozen=True)
class Parse:
    statement: str
    query: str
    param_types: tuple[int, ...] = ()


def parse_parse(body: bytes) -> Parse:
    reader = Reader(body)
    statement = reader.cstring()
    text = reader.cstring()
    count = reader.int16()
    return Parse(statement, text, tuple(reader.int32() & 0xFFFFFFFF for _ in range(count)))


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...] = field(default=())

    def param_format(self, index: int) -> int:
        if not self.param_formats:
            return 0
        return self.param_formats[0] if len(self.param_formats) == 1 else self.param_formats[index]


def parse_bind(body: bytes) -> Bind:
    bind = _parse_bind_fast(body)
    return bind if bind is not None else _parse_bind(body)


def _parse_bind_fast(body: bytes) -> Bind | None:
    """A well-formed Bind (every Execute of a prepared statement brings one) without a Reader;
    None for anything unusual, which `_parse_bind` then decodes or refuses."""
    size = len(body)
    portal_end = body.find(b"\x00")
    statement_end = body.find(b"\x00", portal_end + 1) if portal_end >= 0 else -1
    if statement_end < 0 or statement_end + 3 > size:
        return None
    pos = statement_end + 1
    count = _UNPACK_INT16(body, pos)[0]
    pos += 2
    if count < 0 or pos + 2 * count + 2 > size:
        return None
    formats = struct.unpack_from(f"!{count}h", body, pos) if count else ()
    pos += 2 * count
    count = _UNPACK_INT16(body, pos)[0]
    pos += 2
    if count < 0:
        return None
    params: list[bytes | None] = []
    for _ in range(count):
        if pos + 4 > size:
            return None
        length = _UNPACK_INT32(body, pos)[0]
        pos += 4
        if length < 0:
            params.append(None)
        elif pos + length > size:
            return None
        else:
            params.append(body[pos:pos + length])
            pos += length
    if pos + 2 > size:
        return None
    count = _UNPACK_INT16(body, pos)[0]
    pos += 2
    if count < 0 or pos + 2 * count > size or len(formats) not in (0, 1, len(params)):
        return None
    results = struct.unpack_from(f"!{count}h", body, pos) if count else ()
    return Bind(body[:portal_end].decode("utf-8", errors="replace"),
                body[portal_end + 1:statement_end].decode("utf-8", errors="replace"), formats, tuple(params), results)


def _parse_bind(body: bytes) -> Bind:
    reader = Reader(body)
    portal = reader.cstring()
    statement = reader.cstring()
    formats = tuple(reader.int16() for _ in range(reader.int16()))
    params: list[bytes | None] = []
    for _ in range(reader.int16()):
        length = reader.int32()
        params.append(None if length < 0 else reader.take(length))
    results = tuple(reader.int16() for _ in range(reader.int16()))
    if len(formats) not in (0, 1, len(params)):
        raise ProtocolViolation(f"bind message has {len(formats)} parameter formats but {len(params)} parameters")
    return Bind(portal, statement, formats, tuple(params), results)


def bind(message: Bind) -> bytes:
    parts = [cstring(message.portal), cstring(message.statement), _INT16.pack(len(message.param_formats)),
             *(_INT16.pack(f) for f in message.param_formats), _INT16.pack(len(message.params))]
    for value in message.params:
        parts.append(_INT32.pack(-1) if value is None else _INT32.pack(len(value)) + value)
    parts.append(_INT16.pack(len(message.result_formats)))
    parts.extend(_INT16.pack(f) for f in message.result_formats)
    return frame(b"B", b"".join(parts))


def parse_execute(body: bytes) -> tuple[str, int]:
    end = body.find(b"\x00")
    if end >= 0 and end + 5 <= len(body):  # the usual, well-formed case, without a Reader
        return body[:end].decode("utf-8", errors="replace"), _UNPACK_INT32(body, end + 1)[0]
    reader = Reader(body)
    return reader.cstring(), reader.int32()


def parse_close_or_describe(body: bytes) -> tuple[str, str]:
    """(`S` statement or `P` portal, name)."""
    if len(body) >= 2 and body.find(b"\x00", 1) == len(body) - 1:  # the usual case, without a Reader
        return chr(body[0]), body[1:-1].decode("utf-8", errors="replace")
    reader = Reader(body)
    kind = chr(reader.byte())
    return kind, reader.cstring()


def parse_function_call(body: bytes) -> int:
    return Reader(body).int32() & 0xFFFFFFFF
