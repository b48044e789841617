"""The unmasked originals of masked wire bytes, sealed under the break-glass KMS key.

The recording holds what the client saw (the masked stream). What masking replaced is kept only
encrypted, so `proctor evidence reprocess` can later show what newer rules would have masked
without clear text ever reaching a disk. Envelope encryption: a KMS data key per stretch of the
session (rotated after `rotate_bytes` sealed bytes or `rotate_seconds`), AES-256-GCM per record.

In the recording (see recording.py), one session's sealer writes

    META/EVENT     {"sealing_key": i, "kms_key_id": …, "encrypted_data_key": base64, …}
                   announces data key i (i = 0, 1, 2…), just before the first record sealed with it
    <dir>/WIRE_SEALED  the original bytes of the preceding <dir>/WIRE record (META records may
                   sit in between), as
                       !BI   format (1), key index
                       12 B  nonce (random)
                       AES-256-GCM(original) with its 16-byte tag; the associated data binds
                       session id, format, key index and direction

Every sealed record uses the most recently announced key, so a record moved across a key
change fails; one moved to another session or direction fails authentication. The data key's
KMS encryption context is {proctor:session, proctor:purpose}: the gateway may only generate
such keys, and only the break-glass role may decrypt them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from control_plane.contract import SEALED_CONTEXT_PURPOSE, SEALED_CONTEXT_SESSION, SEALED_PURPOSE
from data_plane.core.recording import EVENT, FROM_CLIENT, FROM_GATEWAY, FROM_SERVER, META, WIRE, WIRE_SEALED, Record

if TYPE_CHECKING:
    from data_plane.config import GatewayConfig

log = logging.getLogger("proctor.sealing")

FORMAT = 1
ALGORITHM = "AES-256-GCM"
PREFIX = struct.Struct("!BI")  # format, key index
NONCE_SIZE = 12
TAG_SIZE = 16
DEFAULT_ROTATE_BYTES = 8 << 20
DEFAULT_ROTATE_SECONDS = 300.0
# While KMS cannot give a fresh key, the current one seals on up to this multiple of its budget;
# far below AES-GCM's limits for random nonces (2**32 messages), and then the session fails closed.
OVERUSE_FACTOR = 4
MAX_RECORDS_PER_KEY = 1 << 24
PREFETCH_RETRY_SECONDS = 5.0
_AAD_LABEL = b"proctor-sealed\x00"
_AAD_TAIL = struct.Struct("!BIB")  # format, key index, direction
_KMS_ERRORS = (BotoCoreError, ClientError, OSError)
_ACCESS_DENIED = ("AccessDeniedException", "AccessDenied")

RecordFn = Callable[[int, int, bytes], None]  # (direction, kind, payload): RecordingWriter.append
_urandom = os.urandom


class Kms(Protocol):
    """The KMS calls sealing and unsealing make; a boto3 KMS client is one."""

    def generate_data_key(self, **kwargs: Any) -> dict[str, Any]: ...

    def decrypt(self, **kwargs: Any) -> dict[str, Any]: ...


class SealingError(Exception):
    pass


class SealingUnavailable(SealingError):
    """No data key to seal with (KMS unreachable or refusing): the session must fail closed."""


class UnsealError(SealingError):
    """A sealed record does not open: altered, reordered, or from another session."""


class UnsealAccessDenied(UnsealError):
    """The caller may not decrypt the session's data keys (kms:Decrypt on the break-glass key)."""


def encryption_context(session_id: str) -> dict[str, str]:
    return {SEALED_CONTEXT_SESSION: session_id, SEALED_CONTEXT_PURPOSE: SEALED_PURPOSE}


def associated_data(session_id: str, key_index: int, direction: int) -> bytes:
    return _AAD_LABEL + session_id.encode() + b"\x00" + _AAD_TAIL.pack(FORMAT, key_index, direction)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _aead(plaintext_key: bytes) -> AESGCM:
    """AES-GCM over a KMS plaintext data key; our copy of the key bytes is zeroed at once."""
    key = bytearray(plaintext_key)
    try:
        return AESGCM(key)
    finally:
        key[:] = bytes(len(key))


# ------------------------------------------------------------------------------------------------
# sealing (the gateway)
# ------------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _DataKey:
    index: int
    aead: AESGCM
    prefix: bytes
    aad: dict[int, bytes]
    announcement: bytes
    opened_at: float = 0.0
    sealed_bytes: int = 0
    sealed_records: int = 0


class PayloadSealer:
    """Seals one session's unmasked originals. `open()` before the first `seal()`; all calls on the
    session's event loop. `seal()` never waits on KMS: the next data key is fetched in the
    background once the current one is half spent."""

    def __init__(self, kms: Kms, key_id: str, session_id: str, record: RecordFn, *,
                 rotate_bytes: int = DEFAULT_ROTATE_BYTES, rotate_seconds: float = DEFAULT_ROTATE_SECONDS,
                 open_timeout: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if rotate_bytes <= 0 or rotate_seconds <= 0:
            raise ValueError("rotate_bytes and rotate_seconds must be positive")
        self.key_id = key_id
        self.session_id = session_id
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.open_timeout = open_timeout
        self._kms = kms
        self._record = record
        self._clock = clock
        self._context = encryption_context(session_id)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._key: _DataKey | None = None
        self._next: _DataKey | None = None
        self._fetching: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._slow_path_bytes = rotate_bytes // 2
        self._slow_path_at = 0.0
        self._retired = [0, 0]  # bytes, records sealed under keys no longer in use
        self._keys_used = 0
        self._closed = False

    async def open(self) -> None:
        """Fetch data key 0 and announce it; raises SealingUnavailable when KMS cannot give one."""
        if self._key is not None or self._closed:
            raise SealingError("a sealer opens once")
        self._loop = asyncio.get_running_loop()
        try:
            key = await asyncio.wait_for(asyncio.to_thread(self._generate, 0), self.open_timeout)
        except (TimeoutError, *_KMS_ERRORS) as exc:
            reason = f"timed out after {self.open_timeout:g}s" if isinstance(exc, TimeoutError) else _describe(exc)
            raise SealingUnavailable(
                f"no data key from the break-glass key {self.key_id} for session {self.session_id}: {reason}"
            ) from exc
        self._activate(key)

    def seal(self, direction: int, original: bytes | bytearray | memoryview) -> None:
        """Record `original` (what the preceding WIRE record of `direction` held before masking)."""
        key = self._key
        if key is None:
            raise SealingError("the sealer is not open")
        size = len(original)
        # Fast path until this record would take the key past half its budget.
        if key.sealed_bytes + size >= self._slow_path_bytes or key.sealed_records >= MAX_RECORDS_PER_KEY \
                or self._clock() >= self._slow_path_at:
            key = self._maintain(key)
        try:
            aad = key.aad[direction]
        except KeyError:
            raise ValueError(f"only wire directions are sealed, not {direction}") from None
        nonce = _urandom(NONCE_SIZE)
        self._record(direction, WIRE_SEALED, key.prefix + nonce + key.aead.encrypt(nonce, original, aad))
        key.sealed_bytes += size
        key.sealed_records += 1

    def starved(self, upcoming: int) -> bool:
        """Whether sealing `upcoming` more bytes would need a fresh data key that is not here yet:
        the relay then holds the stream (`replenish`) instead of failing the session."""
        key = self._key
        if key is None or self._next is not None:
            return False
        return key.sealed_bytes + upcoming >= self.rotate_bytes * OVERUSE_FACTOR \
            or key.sealed_records >= MAX_RECORDS_PER_KEY - 1

    async def replenish(self, timeout: float = 30.0) -> None:
        """Wait (the stream held) until the next data key is here; SealingUnavailable after `timeout`."""
        deadline = self._clock() + timeout
        while self._next is None:
            if self._closed or self._key is None:
                raise SealingUnavailable("the sealer is closed")
            if self._clock() >= deadline:
                raise SealingUnavailable(f"no fresh data key from the break-glass key {self.key_id} for session "
                                         f"{self.session_id} within {timeout:g}s")
            self._retry_at = 0.0
            self._prefetch(self._key.index + 1)
            fetching = self._fetching
            if fetching is not None:
                await asyncio.wait({fetching}, timeout=max(0.0, deadline - self._clock()))
            else:
                await asyncio.sleep(0.2)

    def close(self) -> None:
        """Drop the data keys (they live nowhere else) and stop any prefetch."""
        self._closed = True
        if self._fetching is not None:
            self._fetching.cancel()
            self._fetching = None
        if self._key is not None:
            self._retire(self._key)
        self._key = self._next = None

    def stats(self) -> dict[str, int]:
        """Totals for the session summary: data keys used, records and bytes sealed."""
        current = self._key
        return {
            "sealed_keys": self._keys_used,
            "sealed_bytes": self._retired[0] + (current.sealed_bytes if current else 0),
            "sealed_records": self._retired[1] + (current.sealed_records if current else 0),
        }

    # -- keys ------------------------------------------------------------------------------------

    def _generate(self, index: int) -> _DataKey:
        """One KMS GenerateDataKey (run in a worker thread: boto3 blocks)."""
        response = self._kms.generate_data_key(KeyId=self.key_id, KeySpec="AES_256",
                                               EncryptionContext=self._context)
        aead = _aead(response.pop("Plaintext"))
        announcement = {
            "sealing_key": index,
            "kms_key_id": response.get("KeyId") or self.key_id,
            "encrypted_data_key": base64.b64encode(response["CiphertextBlob"]).decode(),
            "algorithm": ALGORITHM,
            "format": FORMAT,
            "encryption_context": self._context,
        }
        return _DataKey(
            index=index,
            aead=aead,
            prefix=PREFIX.pack(FORMAT, index),
            aad={d: associated_data(self.session_id, index, d) for d in (FROM_CLIENT, FROM_SERVER, FROM_GATEWAY)},
            announcement=json.dumps(announcement, sort_keys=True).encode(),
        )

    def _activate(self, key: _DataKey) -> _DataKey:
        """Announce `key` in the recording and seal with it from now on."""
        self._record(META, EVENT, key.announcement)
        self._keys_used += 1
        key.opened_at = self._clock()
        if self._key is not None:
            self._retire(self._key)
        self._key = key
        self._slow_path_at = key.opened_at + self.rotate_seconds / 2
        return key

    def _retire(self, key: _DataKey) -> None:
        self._retired[0] += key.sealed_bytes
        self._retired[1] += key.sealed_records

    def _maintain(self, key: _DataKey) -> _DataKey:
        """The slow path, once the current key is half spent: prefetch the next key, switch to it
        when due and ready, and refuse to stretch the current one past its bound."""
        due = key.sealed_bytes >= self.rotate_bytes or self._clock() - key.opened_at >= self.rotate_seconds
        if due and self._next is not None:
            fresh, self._next = self._next, None
            return self._activate(fresh)
        self._prefetch(key.index + 1)
        if key.sealed_bytes >= self.rotate_bytes * OVERUSE_FACTOR or key.sealed_records >= MAX_RECORDS_PER_KEY:
            raise SealingUnavailable(
                f"data key {key.index} of session {self.session_id} is spent and the break-glass key "
                f"{self.key_id} gave no fresh one"
            )
        return key

    def _prefetch(self, index: int) -> None:
        if self._next is not None or self._fetching is not None or self._closed or self._loop is None:
            return
        if self._clock() < self._retry_at:
            return
        self._fetching = self._loop.create_task(self._fetch(index), name=f"sealing-key-{self.session_id}-{index}")

    async def _fetch(self, index: int) -> None:
        try:
            self._next = await asyncio.to_thread(self._generate, index)
        except _KMS_ERRORS as exc:
            self._retry_at = self._clock() + PREFETCH_RETRY_SECONDS
            log.warning("session %s: data key %d unavailable (%s); sealing stays on the current key",
                        self.session_id, index, _describe(exc))
        finally:
            self._fetching = None


@dataclass(frozen=True)
class BreakGlassKey:
    """The gateway's handle on the break-glass key: a sealer for each session that masks."""

    kms: Kms
    key_id: str
    rotate_bytes: int = DEFAULT_ROTATE_BYTES
    rotate_seconds: float = DEFAULT_ROTATE_SECONDS

    def sealer(self, session_id: str, record: RecordFn) -> PayloadSealer:
        return PayloadSealer(self.kms, self.key_id, session_id, record,
                             rotate_bytes=self.rotate_bytes, rotate_seconds=self.rotate_seconds)

    @classmethod
    def from_config(cls, config: GatewayConfig) -> BreakGlassKey | None:
        """None when no break-glass key is configured."""
        if not config.breakglass_key_id:
            return None
        import boto3
        from botocore.config import Config

        # The key lives with the evidence, maybe in another region; an ARN names it.
        region = key_region(config.breakglass_key_id) or config.evidence_region or config.region
        # A session waits on the first key: fail fast rather than after botocore's minute of retries.
        client = boto3.client("kms", region_name=region, config=Config(
            connect_timeout=3, read_timeout=5, retries={"max_attempts": 3, "mode": "standard"}))
        return cls(client, config.breakglass_key_id, rotate_bytes=config.sealed_rotate_bytes,
                   rotate_seconds=config.sealed_rotate_seconds)


def key_region(key_id: str) -> str | None:
    """The region of a key ARN (arn:aws:kms:<region>:<account>:key/…); None for ids and aliases."""
    parts = key_id.split(":")
    if len(parts) < 6 or parts[0] != "arn":
        return None
    return parts[3] or None


# ------------------------------------------------------------------------------------------------
# unsealing (reprocessing, in memory only)
# ------------------------------------------------------------------------------------------------


class _KeyRing:
    """The data key a session's sealed records use, decrypted with KMS when first needed."""

    def __init__(self, kms: Kms, session_id: str) -> None:
        self._kms = kms
        self._session_id = session_id
        self._context = encryption_context(session_id)
        self._announced = -1
        self._announcement: Mapping[str, Any] | None = None
        self._aead: AESGCM | None = None

    def announce(self, record: Record) -> None:
        try:
            doc = json.loads(record.payload)
        except ValueError:
            return
        if not isinstance(doc, dict) or "sealing_key" not in doc:
            return
        index = doc["sealing_key"]
        if type(index) is not int or index != self._announced + 1:
            raise UnsealError(f"record {record.seq} announces data key {index!r} where key "
                              f"{self._announced + 1} was due: records reordered or missing")
        self._announced += 1
        self._announcement, self._aead = doc, None

    def open(self, record: Record) -> bytes:
        payload = record.payload
        if len(payload) < PREFIX.size + NONCE_SIZE + TAG_SIZE:
            raise UnsealError(f"sealed record {record.seq} is truncated")
        version, index = PREFIX.unpack_from(payload)
        if version != FORMAT:
            raise UnsealError(f"sealed record {record.seq} has format {version}; this reader knows {FORMAT}")
        if index != self._announced:
            current = "none" if self._announced < 0 else str(self._announced)
            raise UnsealError(f"sealed record {record.seq} names data key {index} but the current key is "
                              f"{current}: records reordered across a key change")
        nonce = payload[PREFIX.size:PREFIX.size + NONCE_SIZE]
        try:
            return self._current(index).decrypt(nonce, payload[PREFIX.size + NONCE_SIZE:],
                                                associated_data(self._session_id, index, record.direction))
        except InvalidTag:
            raise UnsealError(f"sealed record {record.seq} fails authentication: altered, or moved from "
                              f"another session, direction or key") from None

    def _current(self, index: int) -> AESGCM:
        if self._aead is None:
            assert self._announcement is not None  # index == self._announced >= 0
            self._aead = self._decrypt_data_key(index, self._announcement)
        return self._aead

    def _decrypt_data_key(self, index: int, doc: Mapping[str, Any]) -> AESGCM:
        kms_key_id = str(doc.get("kms_key_id"))
        try:
            blob = base64.b64decode(doc["encrypted_data_key"], validate=True)
            response = self._kms.decrypt(CiphertextBlob=blob, EncryptionContext=self._context, KeyId=kms_key_id)
            return _aead(response["Plaintext"])
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _ACCESS_DENIED:
                raise UnsealAccessDenied(
                    f"kms:Decrypt on {kms_key_id} was refused: the unmasked payloads of session "
                    f"{self._session_id} open only for the break-glass role (assumed with MFA)"
                ) from exc
            raise UnsealError(f"data key {index} of session {self._session_id} does not decrypt under its "
                              f"encryption context ({code}): it belongs to another session or was altered") from exc
        except BotoCoreError as exc:
            raise UnsealError(f"KMS unreachable while opening data key {index}: {_describe(exc)}") from exc
        except (KeyError, ValueError) as exc:
            raise UnsealError(f"the announcement of data key {index} is malformed: {_describe(exc)}") from exc


def unseal_records(records: Iterable[Record], kms: Kms, session_id: str) -> Iterator[Record]:
    """The records of one session (in order, chain already verified), each WIRE_SEALED record
    carrying its decrypted original as payload; every other record unchanged. KMS is asked once
    per data key, and only for keys a sealed record uses."""
    keys = _KeyRing(kms, session_id)
    for record in records:
        if record.kind == WIRE_SEALED:
            yield replace(record, payload=keys.open(record))
            continue
        if record.direction == META and record.kind == EVENT:
            keys.announce(record)
        yield record


def unmasked_records(records: Iterable[Record], kms: Kms, session_id: str) -> list[Record]:
    """The session as relayed before masking: each WIRE record that was masked carries its
    original bytes instead, and the sealed records are gone. (Those WIRE records' `hash` then no
    longer matches their payload: this view is for analysis, never for verification.)"""
    out: list[Record] = []
    masked_at: dict[int, int] = {}  # direction -> position in `out` of its latest WIRE record
    for record in unseal_records(records, kms, session_id):
        if record.kind == WIRE_SEALED:
            position = masked_at.pop(record.direction, None)
            if position is None:
                raise UnsealError(f"sealed record {record.seq} follows no WIRE record of its direction")
            out[position] = replace(out[position], payload=record.payload)
            continue
        if record.kind == WIRE:
            masked_at[record.direction] = len(out)
        out.append(record)
    return out
