"""Sealed originals: what masking replaced is kept only under the break-glass key, opens again in
memory with kms:Decrypt, and refuses to open when altered, moved or reordered."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from moto import mock_aws

from data_plane.config import GatewayConfig
from data_plane.core.recording import (
    EVENT,
    FROM_CLIENT,
    FROM_SERVER,
    META,
    WIRE,
    WIRE_SEALED,
    Record,
    RecordingWriter,
    genesis,
    read_records,
)
from data_plane.core.sealed import (
    DEFAULT_ROTATE_BYTES,
    DEFAULT_ROTATE_SECONDS,
    OVERUSE_FACTOR,
    PREFIX,
    BreakGlassKey,
    PayloadSealer,
    SealingUnavailable,
    UnsealAccessDenied,
    UnsealError,
    key_region,
    unmasked_records,
    unseal_records,
)
from proctor.dev import aws
from proctor.replay import Recording, postgres_timeline

SESSION = "s20250101120000abcdef123456"
ROW = b"D\x00\x00\x00\x1b\x00\x01\x00\x00\x00\x11alice@example.com"
MASKED_ROW = b"D\x00\x00\x00\x1b\x00\x01\x00\x00\x00\x11*****************"


class CountingKms:
    """moto's KMS, with a note of every call: which thread made it, and the plaintext keys."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[tuple[str, int]] = []
        self.plaintext_keys: list[bytes] = []  # one per data key handed out
        self.gate = threading.Event()
        self.gate.set()
        self.fail_generate: Exception | None = None
        self.deny_decrypt = False

    def generate_data_key(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("generate", threading.get_ident()))
        assert self.gate.wait(10)
        if self.fail_generate is not None:
            raise self.fail_generate
        response = self.client.generate_data_key(**kwargs)
        self.plaintext_keys.append(bytes(response["Plaintext"]))
        return response

    def decrypt(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("decrypt", threading.get_ident()))
        if self.deny_decrypt:
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}}, "Decrypt")
        return self.client.decrypt(**kwargs)

    def count(self, name: str) -> int:
        return sum(1 for call, _ in self.calls if call == name)


@pytest.fixture
def kms() -> Iterator[CountingKms]:
    with mock_aws():
        client = aws.client(None, "kms")  # one boto3 session: service models load once
        aws.create_breakglass_key(client)
        yield CountingKms(client)


class Session:
    """A real recording file and the sealer writing into it."""

    def __init__(self, directory: Path, kms: CountingKms, **options: Any) -> None:
        self.path = directory / "recording.bin"
        self.writer = RecordingWriter(self.path, SESSION, fsync_interval=60)
        self.sealer = PayloadSealer(kms, aws.BREAKGLASS_KEY_ALIAS, SESSION, self.writer.append, **options)

    def masked(self, direction: int, masked: bytes, original: bytes) -> None:
        """What the relay does with a masked message: record what it relays, then seal the original."""
        self.writer.append(direction, WIRE, masked)
        self.sealer.seal(direction, original)

    def records(self) -> list[Record]:
        self.writer.close()
        return list(read_records(self.path.read_bytes(), genesis(SESSION)))


def _key_events(records: list[Record]) -> list[dict[str, Any]]:
    return [doc for r in records if r.kind == EVENT and "sealing_key" in (doc := r.json())]


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def _prefetched(sealer: PayloadSealer) -> None:
    """Let a background prefetch finish (its KMS call in a thread, then its task on the loop)."""
    await _until(lambda: sealer._fetching is None)


# -- round trip ----------------------------------------------------------------------------------


async def test_sealed_originals_open_again_in_memory_and_replace_the_masked_bytes(
        kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms)
    await session.sealer.open()
    session.writer.append(FROM_CLIENT, WIRE, b"Q\x00\x00\x00\x0dSELECT 1\x00")
    session.masked(FROM_SERVER, MASKED_ROW, ROW)
    session.masked(FROM_SERVER, b"D-masked-2", b"D-original-2")
    session.sealer.close()
    records = session.records()

    assert [(r.direction, r.kind) for r in records] == [
        (META, EVENT), (FROM_CLIENT, WIRE), (FROM_SERVER, WIRE), (FROM_SERVER, WIRE_SEALED),
        (FROM_SERVER, WIRE), (FROM_SERVER, WIRE_SEALED)]
    opened = list(unseal_records(records, kms, SESSION))
    assert [r.payload for r in opened if r.kind == WIRE_SEALED] == [ROW, b"D-original-2"]
    assert [(r.seq, r.kind) for r in opened] == [(r.seq, r.kind) for r in records]
    assert kms.count("decrypt") == 1  # one data key, decrypted once per reading

    unmasked = unmasked_records(records, kms, SESSION)
    assert [(r.direction, r.kind, r.payload) for r in unmasked[1:]] == [
        (FROM_CLIENT, WIRE, b"Q\x00\x00\x00\x0dSELECT 1\x00"), (FROM_SERVER, WIRE, ROW),
        (FROM_SERVER, WIRE, b"D-original-2")]


async def test_the_key_event_names_the_key_and_the_recording_holds_no_clear_text(
        kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms)
    await session.sealer.open()
    session.masked(FROM_SERVER, MASKED_ROW, ROW)
    session.sealer.close()
    records = session.records()

    (event,) = _key_events(records)
    key_arn = kms.client.describe_key(KeyId=aws.BREAKGLASS_KEY_ALIAS)["KeyMetadata"]["Arn"]
    assert event["sealing_key"] == 0
    assert event["kms_key_id"] == key_arn
    assert event["algorithm"] == "AES-256-GCM"
    assert event["encryption_context"] == {"proctor:session": SESSION, "proctor:purpose": "unmasked-payload"}
    assert base64.b64decode(event["encrypted_data_key"])
    on_disk = session.path.read_bytes()
    (data_key,) = kms.plaintext_keys
    assert data_key not in on_disk
    assert base64.b64encode(data_key) not in on_disk
    assert b"alice@example.com" not in on_disk


async def test_sealed_payload_is_header_nonce_and_ciphertext(kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms)
    await session.sealer.open()
    session.masked(FROM_SERVER, MASKED_ROW, ROW)
    (sealed,) = [r for r in session.records() if r.kind == WIRE_SEALED]
    assert PREFIX.unpack_from(sealed.payload) == (1, 0)
    assert len(sealed.payload) == PREFIX.size + 12 + len(ROW) + 16


# -- refusals ------------------------------------------------------------------------------------


async def _sealed_session(kms: CountingKms, tmp_path: Path, **options: Any) -> list[Record]:
    session = Session(tmp_path, kms, **options)
    await session.sealer.open()
    session.masked(FROM_SERVER, MASKED_ROW, ROW)
    session.masked(FROM_CLIENT, b"P-masked", b"P-original")
    session.sealer.close()
    return session.records()


def _with(records: list[Record], index: int, **changes: Any) -> list[Record]:
    return [replace(r, **changes) if i == index else r for i, r in enumerate(records)]


async def test_an_altered_ciphertext_fails_authentication(kms: CountingKms, tmp_path: Path) -> None:
    records = await _sealed_session(kms, tmp_path)
    at = next(i for i, r in enumerate(records) if r.kind == WIRE_SEALED)
    payload = bytearray(records[at].payload)
    payload[-1] ^= 1
    with pytest.raises(UnsealError, match=rf"sealed record {records[at].seq} fails authentication"):
        list(unseal_records(_with(records, at, payload=bytes(payload)), kms, SESSION))


async def test_a_sealed_record_moved_to_the_other_direction_fails_authentication(
        kms: CountingKms, tmp_path: Path) -> None:
    records = await _sealed_session(kms, tmp_path)
    at = next(i for i, r in enumerate(records) if r.kind == WIRE_SEALED)
    with pytest.raises(UnsealError, match="fails authentication"):
        list(unseal_records(_with(records, at, direction=FROM_CLIENT), kms, SESSION))


async def test_another_sessions_id_does_not_open_the_data_key(kms: CountingKms, tmp_path: Path) -> None:
    records = await _sealed_session(kms, tmp_path)
    with pytest.raises(UnsealError, match="does not decrypt under its encryption context"):
        list(unseal_records(records, kms, "s20250101120000000000000000"))


async def test_a_header_naming_another_key_is_refused(kms: CountingKms, tmp_path: Path) -> None:
    records = await _sealed_session(kms, tmp_path)
    at = next(i for i, r in enumerate(records) if r.kind == WIRE_SEALED)
    forged = PREFIX.pack(1, 1) + records[at].payload[PREFIX.size:]
    with pytest.raises(UnsealError, match="names data key 1 but the current key is 0"):
        list(unseal_records(_with(records, at, payload=forged), kms, SESSION))


async def test_records_reordered_across_a_key_change_are_refused(kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms, rotate_bytes=64)
    await session.sealer.open()
    session.masked(FROM_SERVER, b"D-masked-0", b"x" * 40)  # past half the budget: key 1 is fetched
    await _prefetched(session.sealer)
    session.masked(FROM_SERVER, b"D-masked-1", b"y" * 40)  # still key 0 (budget not spent)
    session.masked(FROM_SERVER, b"D-masked-2", b"z" * 40)  # spent: key 1 announced, then used
    session.sealer.close()
    records = session.records()
    assert [(r.kind, PREFIX.unpack_from(r.payload)[1] if r.kind == WIRE_SEALED else None) for r in records
            if r.kind != WIRE] == [(EVENT, None), (WIRE_SEALED, 0), (WIRE_SEALED, 0), (EVENT, None), (WIRE_SEALED, 1)]
    assert [r.payload for r in unseal_records(records, kms, SESSION) if r.kind == WIRE_SEALED] == [
        b"x" * 40, b"y" * 40, b"z" * 40]

    key_1 = next(i for i, r in enumerate(records) if r.kind == EVENT and r.json()["sealing_key"] == 1)
    under_key_0 = max(i for i in range(key_1) if records[i].kind == WIRE_SEALED)
    moved = records[:under_key_0] + records[under_key_0 + 1:key_1 + 1] + [records[under_key_0]] + records[key_1 + 1:]
    with pytest.raises(UnsealError, match="reordered across a key change"):
        list(unseal_records(moved, kms, SESSION))
    without_key_0 = records[1:]
    with pytest.raises(UnsealError, match="names data key 0 but the current key is none"):
        list(unseal_records(without_key_0, kms, SESSION))
    without_key_1_event = records[:key_1] + records[key_1 + 1:]
    with pytest.raises(UnsealError, match="names data key 1 but the current key is 0"):
        list(unseal_records(without_key_1_event, kms, SESSION))
    twice_key_0 = [records[0], *records]
    with pytest.raises(UnsealError, match="announces data key 0 where key 1 was due"):
        list(unseal_records(twice_key_0, kms, SESSION))


async def test_unsealing_without_kms_decrypt_says_the_break_glass_role_is_needed(
        kms: CountingKms, tmp_path: Path) -> None:
    records = await _sealed_session(kms, tmp_path)
    kms.deny_decrypt = True
    with pytest.raises(UnsealAccessDenied, match=r"kms:Decrypt on arn:aws:kms:.* was refused.*break-glass role"):
        list(unseal_records(records, kms, SESSION))


async def test_a_session_that_sealed_nothing_reads_without_kms(kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms)
    await session.sealer.open()
    session.writer.append(FROM_SERVER, WIRE, b"C\x00\x00\x00\x0dSELECT 0\x00")
    session.sealer.close()
    kms.deny_decrypt = True
    records = session.records()
    assert unmasked_records(records, kms, SESSION) == records
    assert kms.count("decrypt") == 0


async def test_a_sealed_record_without_its_masked_record_is_refused(kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms)
    await session.sealer.open()
    session.sealer.seal(FROM_SERVER, ROW)  # no WIRE record before it
    with pytest.raises(UnsealError, match="follows no WIRE record of its direction"):
        unmasked_records(session.records(), kms, SESSION)


# -- keys: rotation, prefetch, failing closed ----------------------------------------------------


async def test_a_fresh_data_key_after_n_bytes_is_announced_and_still_decrypts(
        kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms, rotate_bytes=1000)
    await session.sealer.open()
    originals = [bytes([i]) * 300 for i in range(12)]
    for i, original in enumerate(originals):
        session.masked(FROM_SERVER, b"D-masked-%d" % i, original)
        await _prefetched(session.sealer)  # a relay yields between reads: the prefetch gets its turn
    session.sealer.close()
    stats = session.sealer.stats()
    records = session.records()

    events = _key_events(records)
    assert [e["sealing_key"] for e in events] == list(range(len(events)))
    assert len(events) == 3  # 3600 bytes, 1000 per key: each key seals 4 records of 300 (1200 > 1000: bounded overrun)
    assert len({e["encrypted_data_key"] for e in events}) == len(events)
    assert stats == {"sealed_keys": len(events), "sealed_bytes": 3600, "sealed_records": 12}
    assert [r.payload for r in unmasked_records(records, kms, SESSION) if r.direction == FROM_SERVER] == originals
    assert kms.count("decrypt") == len(events)


async def test_a_fresh_data_key_after_m_seconds(kms: CountingKms, tmp_path: Path) -> None:
    now = [1000.0]
    session = Session(tmp_path, kms, rotate_seconds=60, clock=lambda: now[0])
    await session.sealer.open()
    session.masked(FROM_SERVER, b"D-masked-0", b"first")
    now[0] += 31  # half the key's time: the next one is fetched
    session.masked(FROM_SERVER, b"D-masked-1", b"second")
    await _prefetched(session.sealer)
    now[0] += 30  # due: the next seal switches
    session.masked(FROM_SERVER, b"D-masked-2", b"third")
    session.sealer.close()
    records = session.records()
    assert [e["sealing_key"] for e in _key_events(records)] == [0, 1]
    assert [r.payload for r in unmasked_records(records, kms, SESSION) if r.direction == FROM_SERVER] == [
        b"first", b"second", b"third"]


async def test_seal_never_waits_on_kms_and_keeps_the_current_key_until_the_next_is_ready(
        kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms, rotate_bytes=1000)
    await session.sealer.open()
    kms.gate.clear()  # KMS hangs from now on
    try:
        sealing = 0.0
        for i in range(10):
            started = time.perf_counter()
            session.masked(FROM_SERVER, b"D-masked-%d" % i, b"v" * 300)  # 3000 bytes: three budgets
            sealing += time.perf_counter() - started
            await asyncio.sleep(0)
        assert sealing < 2.0  # a hanging KMS call would take the gate's 10 s
        assert session.sealer.stats()["sealed_keys"] == 1
        await _until(lambda: kms.count("generate") >= 2)
        assert kms.count("generate") == 2  # key 0 at open, key 1 prefetching (blocked)
        loop_thread = threading.get_ident()
        assert all(thread != loop_thread for _, thread in kms.calls), "KMS was called on the event loop"
    finally:
        kms.gate.set()
    await _prefetched(session.sealer)
    session.masked(FROM_SERVER, b"D-masked-late", b"w" * 10)
    assert session.sealer.stats()["sealed_keys"] == 2
    session.sealer.close()
    assert len(_key_events(session.records())) == 2


async def test_sealing_fails_closed_once_the_current_key_is_spent_and_kms_stays_away(
        kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms, rotate_bytes=1000)
    await session.sealer.open()
    kms.fail_generate = EndpointConnectionError(endpoint_url="https://kms.us-east-1.amazonaws.com")
    sealed = 0
    with pytest.raises(SealingUnavailable, match=r"data key 0 .* is spent"):
        while True:
            session.sealer.seal(FROM_SERVER, b"v" * 100)
            sealed += 100
            await asyncio.sleep(0)
    assert sealed == 1000 * OVERUSE_FACTOR


async def test_open_fails_clearly_when_kms_is_unreachable(tmp_path: Path) -> None:
    unreachable = boto3.client("kms", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                               aws_access_key_id="x", aws_secret_access_key="x",
                               config=Config(connect_timeout=1, retries={"max_attempts": 1}))
    sealer = PayloadSealer(unreachable, aws.BREAKGLASS_KEY_ALIAS, SESSION, lambda *_: None)
    with pytest.raises(SealingUnavailable, match="no data key from the break-glass key alias/proctor-breakglass"):
        await sealer.open()


async def test_open_fails_clearly_when_the_key_does_not_exist(kms: CountingKms) -> None:
    written: list[Any] = []
    sealer = PayloadSealer(kms, "alias/not-there", SESSION, lambda *args: written.append(args))
    with pytest.raises(SealingUnavailable, match="NotFoundException"):
        await sealer.open()
    assert not written


async def test_open_gives_up_after_its_timeout(kms: CountingKms) -> None:
    kms.gate.clear()
    sealer = PayloadSealer(kms, aws.BREAKGLASS_KEY_ALIAS, SESSION, lambda *_: None, open_timeout=0.1)
    try:
        with pytest.raises(SealingUnavailable, match=r"timed out after 0\.1s"):
            await sealer.open()
    finally:
        kms.gate.set()


async def test_only_wire_directions_are_sealed(kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms)
    await session.sealer.open()
    with pytest.raises(ValueError, match="only wire directions"):
        session.sealer.seal(META, b"x")


# -- configuration and the timeline --------------------------------------------------------------


def test_break_glass_settings_come_from_the_environment() -> None:
    env = {"PROCTOR_API_URL": "https://api.example.test/v1", "PROCTOR_REGION": "eu-west-1",
           "PROCTOR_RECORDINGS_BUCKET": "r", "PROCTOR_EVIDENCE_BUCKET": "e", "PROCTOR_SPOOL_DIR": "/tmp/s"}
    plain = GatewayConfig.from_env(env)
    assert plain.breakglass_key_id is None
    assert (plain.sealed_rotate_bytes, plain.sealed_rotate_seconds) == (DEFAULT_ROTATE_BYTES, DEFAULT_ROTATE_SECONDS)
    assert BreakGlassKey.from_config(plain) is None

    arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    config = GatewayConfig.from_env(env | {"PROCTOR_BREAKGLASS_KEY_ID": arn, "PROCTOR_SEALED_ROTATE_BYTES": "4096",
                                           "PROCTOR_SEALED_ROTATE_SECONDS": "30"})
    key = BreakGlassKey.from_config(config)
    assert key is not None
    assert (key.key_id, key.rotate_bytes, key.rotate_seconds) == (arn, 4096, 30.0)
    assert key.kms.meta.region_name == "us-east-1"  # the key's region, not the gateway's
    sealer = key.sealer(SESSION, lambda *_: None)
    assert (sealer.key_id, sealer.session_id, sealer.rotate_bytes) == (arn, SESSION, 4096)


def test_key_region_reads_arns_only() -> None:
    assert key_region("arn:aws:kms:eu-west-1:123456789012:key/abc") == "eu-west-1"
    assert key_region("alias/proctor-breakglass") is None
    assert key_region("1234abcd-12ab-34cd-56ef-1234567890ab") is None


async def test_the_replay_timeline_skips_sealed_records(kms: CountingKms, tmp_path: Path) -> None:
    records = await _sealed_session(kms, tmp_path)
    lines = list(postgres_timeline(Recording(SESSION, records, 1)))
    assert any("unmasked originals sealed under data key 0 of arn:aws:kms:" in line for line in lines)
    assert not any("encrypted_data_key" in line for line in lines)
    assert json.dumps(lines)  # nothing undecodable slipped through


async def test_a_starved_sealer_holds_the_stream_until_the_next_key_arrives(
        kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms, rotate_bytes=1000)
    await session.sealer.open()
    kms.gate.clear()  # KMS slow: the prefetch of key 1 hangs
    while not session.sealer.starved(100):
        session.sealer.seal(FROM_SERVER, b"v" * 100)
        await asyncio.sleep(0)
    waiting = asyncio.ensure_future(session.sealer.replenish(timeout=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # still no key: the relay keeps the stream held
    kms.gate.set()
    await asyncio.wait_for(waiting, 10)
    assert not session.sealer.starved(100)
    session.sealer.seal(FROM_SERVER, b"v" * 100)  # sealed under the fresh key
    session.sealer.close()
    assert len(_key_events(session.records())) == 2


async def test_replenish_gives_up_after_its_timeout(kms: CountingKms, tmp_path: Path) -> None:
    session = Session(tmp_path, kms, rotate_bytes=1000)
    await session.sealer.open()
    kms.fail_generate = EndpointConnectionError(endpoint_url="https://kms.us-east-1.amazonaws.com")
    with pytest.raises(SealingUnavailable, match="no fresh data key"):
        await session.sealer.replenish(timeout=0.5)
    session.sealer.close()
