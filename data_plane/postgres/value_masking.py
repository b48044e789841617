"""Masking one PostgreSQL value on the wire, in text or binary format, so that what the client
receives stays valid for the column's type: text-like values become masked text, values of other
types become NULL (a masked integer or date has no valid form), and values scanned by content
detectors are rewritten only where a detector matched.

Masked text only ever holds `*`, `h:` and hex digits, or the kept tail of the original value, so
it stays valid inside the literals that embed it (arrays, JSON strings, records) when a detector's
match is replaced within a larger value."""

from __future__ import annotations

import struct
from collections.abc import Callable

from data_plane.core.masking import Masking, MaskMethod

# Types whose text and binary forms are the same characters (binary = the text's bytes).
TEXT_TYPES = frozenset({25, 1043, 1042, 19, 705, 114, 142, 18})  # text varchar bpchar name unknown json xml char
JSONB = 3802
JSON_TYPES = frozenset({114, JSONB})
INT8, INT4, INT2, NUMERIC = 20, 23, 21, 1700
# Array types whose elements are text-like: text[] varchar[] bpchar[] name[] json[] jsonb[] xml[].
TEXT_ARRAYS = {1009: 25, 1015: 1043, 1014: 1042, 1003: 19, 199: 114, 3807: JSONB, 143: 142}
# Binary values a detector cannot read (composites, ranges…): scanning them fails closed to NULL.
OPAQUE_BINARY = frozenset({2249, 2287, 17})  # record, record[], bytea

_INT32 = struct.Struct("!i")
_ARRAY_HEADER = struct.Struct("!iiI")

Codec = Callable[[bytes], str]


def codec_for(client_encoding: str) -> str:
    name = client_encoding.upper().replace("-", "").replace("_", "")
    return {"UTF8": "utf-8", "UNICODE": "utf-8", "SQLASCII": "latin-1", "LATIN1": "latin-1",
            "WIN1252": "cp1252", "LATIN9": "iso8859-15", "WIN1251": "cp1251"}.get(name, "utf-8")


class ValueMasker:
    """Applies a method or the content detectors to values of one client encoding."""

    def __init__(self, masking: Masking, encoding: str = "utf-8") -> None:
        self.masking = masking
        self.encoding = encoding

    # whole-value masks (column rules, strict mode) --------------------------------------------
    def whole(self, value: bytes, method: MaskMethod, type_oid: int, binary: bool) -> bytes | None:
        if type_oid in TEXT_TYPES or (type_oid == JSONB and not binary):
            masked = method.apply(value.decode(self.encoding, errors="replace"))
            if masked is None:
                return None
            if type_oid in JSON_TYPES:
                masked = '"' + masked + '"'  # a JSON string: the column stays valid JSON
            return masked.encode(self.encoding, errors="replace")
        if type_oid == JSONB and binary:
            masked = method.apply(value[1:].decode("utf-8", errors="replace"))
            return None if masked is None else b"\x01" + b'"' + masked.encode() + b'"'
        return None  # no valid masked form for this type: NULL

    # content detectors (columns without lineage) -----------------------------------------------
    def scan(self, value: bytes, type_oid: int, binary: bool) -> tuple[bytes | None, list[tuple[str, str]]]:
        """(the value to send, [(rule, detector)] that matched); the value is unchanged when nothing did."""
        masking = self.masking
        if not binary or type_oid in TEXT_TYPES:
            text = value.decode(self.encoding, errors="replace")
            masked, hits = masking.scan(text)
            if not hits:
                return value, hits
            if binary or _masked_text_valid(type_oid):
                return masked.encode(self.encoding, errors="replace"), hits
            return None, hits  # a detector matched inside a number or date: the value cannot stay
        if type_oid == JSONB:
            masked, hits = masking.scan(value[1:].decode("utf-8", errors="replace"))
            return (b"\x01" + masked.encode() if hits else value), hits
        if type_oid in TEXT_ARRAYS:
            return self._scan_binary_array(value)
        if type_oid == INT8:
            _, hits = masking.scan(str(int.from_bytes(value, "big", signed=True)))
            return (None if hits else value), hits
        if type_oid in OPAQUE_BINARY or type_oid >= 16384:  # user-defined types: unknown layout
            return None, [("strict", "opaque binary value")]
        return value, []

    def _scan_binary_array(self, value: bytes) -> tuple[bytes | None, list[tuple[str, str]]]:
        try:
            ndim, _flags, element_oid = _ARRAY_HEADER.unpack_from(value, 0)
            pos = 12 + 8 * ndim
            parts: list[bytes] = [value[:pos]]
            hits: list[tuple[str, str]] = []
            while pos < len(value):
                (length,) = _INT32.unpack_from(value, pos)
                pos += 4
                if length < 0:
                    parts.append(_INT32.pack(-1))
                    continue
                element = value[pos:pos + length]
                pos += length
                masked, found = self.scan(element, element_oid, True)
                hits += found
                if masked is None:
                    masked = b"***"
                parts.append(_INT32.pack(len(masked)) + masked)
        except struct.error:
            return None, [("strict", "malformed array")]
        return (b"".join(parts) if hits else value), hits


def _masked_text_valid(type_oid: int) -> bool:
    """Whether text with a detector's match replaced is still valid for this type in text format
    (records too: "(…,***)" stays a valid record literal)."""
    return type_oid in TEXT_TYPES or type_oid in TEXT_ARRAYS or type_oid in (JSONB, 2249, 2287)
