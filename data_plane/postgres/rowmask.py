"""Rewriting the masked columns of a run of DataRows in one call: each column gets an action
(keep, a constant, NULL, keep the last N characters, the keyed hash, or a Python callable), compiled once per
result plan. A C accelerator does the walk when it was compiled (`ACCELERATED`); the pure-Python
fallback below behaves identically."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["ACCELERATED", "CALL", "CONST", "HASH", "KEEP", "NULL", "PARTIAL", "mask_rows"]

KEEP, CONST, NULL, PARTIAL, CALL, HASH = 0, 1, 2, 3, 4, 5
Action = tuple[int, Any]
MaskRows = Callable[[bytes | memoryview, int, int, tuple[Action, ...]], tuple[bytes | None, list[int]]]

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")


def partial_utf8(value: bytes, keep_last: int) -> bytes:
    """`MaskMethod.partial` on UTF-8 bytes: '*' per character, the last min(N, chars // 2) kept."""
    text = value.decode("utf-8", errors="surrogateescape")
    keep = min(keep_last, len(text) // 2)
    return ("*" * (len(text) - keep) + (text[-keep:] if keep else "")).encode("utf-8", errors="surrogateescape")


def keyed_hash(value: bytes, key: bytes) -> bytes:
    """`MaskMethod.hash` on bytes: "h:" and the first 32 hex digits of HMAC-SHA256."""
    return b"h:" + hmac.new(key, value, hashlib.sha256).hexdigest()[:32].encode()


def _mask_rows_py(buf: bytes | memoryview, start: int, stop: int,
                  actions: tuple[Action, ...]) -> tuple[bytes | None, list[int]]:
    data = bytes(buf)
    counts = [0] * len(actions)
    parts: list[bytes] = []
    copied = start
    pos = start
    while pos < stop:
        if stop - pos < 5:
            raise ValueError("incomplete frame in region")
        (length,) = _INT32.unpack_from(data, pos + 1)
        if length < 4 or length > stop - pos - 1:
            raise ValueError("invalid frame length in region")
        end = pos + 1 + length
        if data[pos] != 0x44:
            pos = end
            continue
        (count,) = _INT16.unpack_from(data, pos + 5)
        if count != len(actions):
            raise ValueError("DataRow does not match its RowDescription")
        cursor = pos + 7
        values: list[bytes | None] = []
        for _ in range(count):
            (size,) = _INT32.unpack_from(data, cursor)
            cursor += 4
            if size < 0:
                values.append(None)
                continue
            if size > end - cursor:
                raise ValueError("DataRow value overruns its frame")
            values.append(data[cursor:cursor + size])
            cursor += size
        if cursor != end:
            raise ValueError("DataRow length does not match its values")
        if not any(v is not None and a[0] != KEEP for v, a in zip(values, actions, strict=True)):
            pos = end
            continue
        out = [b"D", b"\x00\x00\x00\x00", data[pos + 5:pos + 7]]
        row_changed = False
        for index, (value, (kind, arg)) in enumerate(zip(values, actions, strict=True)):
            if value is None or kind == KEEP:
                out.append(b"\xff\xff\xff\xff" if value is None else _INT32.pack(len(value)) + value)
                continue
            masked = (arg if kind == CONST else None if kind == NULL
                      else partial_utf8(value, arg) if kind == PARTIAL
                      else keyed_hash(value, arg) if kind == HASH else arg(value))
            if kind == CALL and masked is value:  # the callable left it alone
                out.append(_INT32.pack(len(value)) + value)
                continue
            counts[index] += 1
            row_changed = True
            out.append(b"\xff\xff\xff\xff" if masked is None else _INT32.pack(len(masked)) + masked)
        if not row_changed:
            pos = end
            continue
        frame = b"".join(out)
        parts += [data[copied:pos], frame[:1] + _INT32.pack(len(frame) - 1) + frame[5:]]
        copied = pos = end
    if not parts:
        return None, counts
    parts.append(data[copied:stop])
    return b"".join(parts), counts


try:
    from data_plane.postgres import _rowmask
except ImportError:  # no compiler where this was installed: the fallback is correct, only slower
    _rowmask = None

mask_rows: MaskRows
if _rowmask is not None:
    mask_rows = _rowmask.mask_rows
    ACCELERATED = True
else:
    mask_rows = _mask_rows_py
    ACCELERATED = False
