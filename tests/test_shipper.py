"""The shipper moves a spooled session to S3 (moto in-process, buckets as the local stack makes
them): recording chunks that verify as one hash chain, event rows, the session index row, every
object checksummed and under Object Lock, and the spool emptied only once all of it is stored."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

import data_plane.shipper as shipper_module
from control_plane.contract import (
    C_ROW_MAY_SET,
    C_ROW_SETS,
    CLASS_DATASTORE_ACTIVITY,
    SESSION_COLUMNS,
    STATUS_FAILURE,
    EventTemplate,
    GzipLines,
    c_row_parts,
    decode_jsonl_gz,
    evidence_event,
    gzip_member,
    iso_millis,
    recording_chunk_key,
    session_event_id,
    session_index_key,
)
from data_plane.core.recording import FROM_CLIENT, FROM_SERVER, META, ChainBroken, _recording, genesis, read_records
from data_plane.core.session import new_session_id
from data_plane.core.spool import SessionEvidence, Spool
from data_plane.shipper import Shipper, _full_row_runs_py
from proctor.dev.aws import EVIDENCE_BUCKET, RECORDINGS_BUCKET, create_resources

REGION = "eu-west-1"
STARTED = datetime(2025, 3, 4, 23, 59, 0, tzinfo=UTC).timestamp()
DT = "2025-03-04"
CLIENT_IP = "203.0.113.7"


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """moto in-process with the local stack's buckets, shared by this module (each test uses its
    own session ids, so their objects never overlap)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with mock_aws():
            create_resources(None)
            yield boto3.client("s3", region_name="us-east-1")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", fsync_interval=3600)


def shipper(s3: Any, spool: Spool, **options: Any) -> Shipper:
    return Shipper(s3, spool.root, recordings_bucket=RECORDINGS_BUCKET, evidence_bucket=EVIDENCE_BUCKET,
                   region=REGION, **options)


def open_session(spool: Spool) -> SessionEvidence:
    return spool.open_session(new_session_id(), {"protocol": "postgres", "started_at": STARTED, "region": REGION,
                                                 "client_ip": CLIENT_IP})


def event_row(evidence: SessionEvidence, activity: str, seconds: float, **fields: Any) -> dict[str, Any]:
    row = evidence_event(CLASS_DATASTORE_ACTIVITY, activity, region=REGION, now=STARTED + seconds,
                         session_id=evidence.session_id, src_ip=CLIENT_IP, **fields)
    evidence.add_event(row)
    return row


def record_some(evidence: SessionEvidence, count: int = 3, size: int = 40) -> list[bytes]:
    payloads = []
    for i in range(count):
        payload = bytes([i % 256]) * size
        evidence.record(FROM_CLIENT if i % 2 == 0 else FROM_SERVER, payload)
        payloads.append(payload)
    return payloads


def keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def body(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def recording_keys(s3: Any, session_id: str) -> list[str]:
    return keys(s3, RECORDINGS_BUCKET, f"recordings/dt={DT}/{session_id}/")


def event_keys(s3: Any, session_id: str) -> list[str]:
    """Events objects holding rows of this session (a round batches every session's events)."""
    return [k for k in keys(s3, EVIDENCE_BUCKET, "events/")
            if any(r["session_id"] == session_id for r in decode_jsonl_gz(body(s3, EVIDENCE_BUCKET, k)))]


def shipped_rows(s3: Any, session_id: str) -> list[dict[str, Any]]:
    return [r for k in event_keys(s3, session_id) for r in decode_jsonl_gz(body(s3, EVIDENCE_BUCKET, k))
            if r["session_id"] == session_id]


def verified_records(s3: Any, session_id: str) -> list[Any]:
    """Every chunk in order, each verified from the last hash of the one before."""
    prev, records = genesis(session_id), []
    for key in recording_keys(s3, session_id):
        obj = s3.get_object(Bucket=RECORDINGS_BUCKET, Key=key)
        assert obj["Metadata"]["first-prev-hash"] == prev.hex()
        chunk = list(read_records(gzip.decompress(obj["Body"].read()), prev))
        assert obj["Metadata"]["last-hash"] == chunk[-1].hash.hex()
        records += chunk
        prev = chunk[-1].hash
    return records


def index_row(s3: Any, session_id: str) -> dict[str, Any]:
    [row] = decode_jsonl_gz(body(s3, EVIDENCE_BUCKET, session_index_key(DT, REGION, session_id)))
    return row


# ------------------------------------------------------------------------------------------------
# a closed session
# ------------------------------------------------------------------------------------------------


def test_closed_session_ships_recording_events_and_index_then_leaves_the_spool(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    sid = evidence.session_id
    rows = [event_row(evidence, "connect", 1)]
    evidence.recording.event({"activity": "connect"})
    payloads = record_some(evidence)
    rows.append(event_row(evidence, "query", 2, statement="SELECT 1", rows=1))
    rows.append(event_row(evidence, "disconnect", 3))
    evidence.close({"statements": 1, "bytes_in": 60, "bytes_out": 60, "src_ip": CLIENT_IP,
                    "ended_at": STARTED + 3})

    written = shipper(s3, spool).ship_once()

    assert written == 3  # one chunk, one events batch, one index row
    assert recording_keys(s3, sid) == [recording_chunk_key(DT, sid, 0)]
    assert recording_chunk_key(DT, sid, 0) == f"recordings/dt={DT}/{sid}/000000.rec.gz"
    records = verified_records(s3, sid)
    assert [r.seq for r in records] == [0, 1, 2, 3]
    assert (records[0].direction, records[0].json()) == (META, {"activity": "connect"})
    assert [r.payload for r in records[1:]] == payloads

    [events_key] = event_keys(s3, sid)
    assert events_key.startswith(f"events/dt={DT}/region={REGION}/")
    assert shipped_rows(s3, sid) == json.loads(json.dumps(rows))

    row = index_row(s3, sid)
    assert set(row) == {name for name, _ in SESSION_COLUMNS}
    assert row["session_id"] == sid
    assert row["protocol"] == "postgres"
    assert row["started_at"] == "2025-03-04T23:59:00.000+00:00"
    assert row["ended_at"] == "2025-03-04T23:59:03.000+00:00"
    assert row["chunks"] == 1
    assert row["last_hash"] == records[-1].hash.hex() == evidence.recording.last_hash
    assert row["recording_prefix"] == f"s3://{RECORDINGS_BUCKET}/recordings/dt={DT}/{sid}/"
    assert (row["statements"], row["bytes_in"], row["bytes_out"]) == (1, 60, 60)
    assert row["src_ip"] == CLIENT_IP
    assert row["gateway_region"] == REGION

    assert not evidence.directory.exists()


def test_every_shipped_object_carries_a_sha256_checksum_and_compliance_lock(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    event_row(evidence, "connect", 1)
    record_some(evidence)
    evidence.close({"ended_at": STARTED + 2})
    shipper(s3, spool).ship_once()
    sid = evidence.session_id
    objects = ([(RECORDINGS_BUCKET, k) for k in recording_keys(s3, sid)]
               + [(EVIDENCE_BUCKET, k) for k in event_keys(s3, sid)]
               + [(EVIDENCE_BUCKET, session_index_key(DT, REGION, sid))])
    assert len(objects) == 3
    for bucket, key in objects:
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        expected = base64.b64encode(hashlib.sha256(body(s3, bucket, key)).digest()).decode()
        assert head["ChecksumSHA256"] == expected
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ContentEncoding"] == "gzip"


def test_deleting_a_shipped_object_version_is_refused(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    record_some(evidence)
    evidence.close({"ended_at": STARTED + 1})
    shipper(s3, spool).ship_once()
    [key] = recording_keys(s3, evidence.session_id)
    version = s3.head_object(Bucket=RECORDINGS_BUCKET, Key=key)["VersionId"]
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=RECORDINGS_BUCKET, Key=key, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert verified_records(s3, evidence.session_id)


def test_session_without_recorded_bytes_still_gets_its_index_row(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    event_row(evidence, "connect", 1, status_detail="refused")
    evidence.close({"ended_at": STARTED + 1})
    assert shipper(s3, spool).ship_once() == 2
    row = index_row(s3, evidence.session_id)
    assert row["chunks"] == 0
    assert row["last_hash"] == genesis(evidence.session_id).hex()
    assert recording_keys(s3, evidence.session_id) == []
    assert not evidence.directory.exists()


# ------------------------------------------------------------------------------------------------
# chunks
# ------------------------------------------------------------------------------------------------


def test_large_recording_is_cut_into_chunks_that_chain_in_order(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    payloads = record_some(evidence, count=40, size=100)
    evidence.close({"ended_at": STARTED + 1})
    ship = shipper(s3, spool, chunk_bytes=1024)
    assert ship.ship_once() > 3
    sid = evidence.session_id
    chunk_keys = recording_keys(s3, sid)
    assert chunk_keys == [recording_chunk_key(DT, sid, n) for n in range(len(chunk_keys))]
    assert len(chunk_keys) >= 6
    for key in chunk_keys:
        assert len(gzip.decompress(body(s3, RECORDINGS_BUCKET, key))) <= 1024
    records = verified_records(s3, sid)
    assert [r.seq for r in records] == list(range(40))
    assert [r.payload for r in records] == payloads
    row = index_row(s3, sid)
    assert row["chunks"] == len(chunk_keys)
    assert row["last_hash"] == records[-1].hash.hex()


def test_a_later_chunk_does_not_verify_without_its_predecessor(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    record_some(evidence, count=20, size=100)
    evidence.close({"ended_at": STARTED + 1})
    shipper(s3, spool, chunk_bytes=1024).ship_once()
    first, second, third, *_ = recording_keys(s3, evidence.session_id)
    last_of_first = list(read_records(gzip.decompress(body(s3, RECORDINGS_BUCKET, first)),
                                      genesis(evidence.session_id)))[-1].hash
    third_data = gzip.decompress(body(s3, RECORDINGS_BUCKET, third))
    with pytest.raises(ChainBroken):  # the second chunk is missing
        list(read_records(third_data, last_of_first))
    with pytest.raises(ChainBroken):
        list(read_records(gzip.decompress(body(s3, RECORDINGS_BUCKET, second)), genesis(evidence.session_id)))


def test_open_session_ships_full_chunks_and_keeps_the_rest_until_due(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    payloads = record_some(evidence, count=20, size=100)  # ~3 KB: two full 1 KB chunks and a remainder
    ship = shipper(s3, spool, chunk_bytes=1024, recording_delay=3600)
    ship.ship_once()
    sid = evidence.session_id
    early = recording_keys(s3, sid)
    assert len(early) >= 2
    progress = json.loads((evidence.directory / "shipped.json").read_text())
    assert 0 < (evidence.directory / "recording.bin").stat().st_size - progress["recording_offset"] < 1024
    payloads += record_some(evidence, count=2, size=10)
    evidence.close({"ended_at": STARTED + 1})
    ship.ship_once()
    records = verified_records(s3, sid)
    assert [r.payload for r in records] == payloads
    assert recording_keys(s3, sid)[:len(early)] == early
    assert not evidence.directory.exists()


def test_a_live_recording_is_read_and_verified_once_for_all_its_chunks(s3: Any, spool: Spool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Cutting many chunks from one read: re-reading (and re-hashing) the rest after every chunk made a
    1M-row session's shipping cost several times the relay's own CPU."""
    verified: list[int] = []
    real = shipper_module.verified_prefix

    def counting(data: bytes | memoryview, prev: bytes) -> tuple[int, bytes]:
        verified.append(len(data))
        return real(data, prev)

    monkeypatch.setattr(shipper_module, "verified_prefix", counting)
    evidence = open_session(spool)
    payloads = record_some(evidence, count=40, size=100)  # ~6 KB: five full 1 KB chunks and a remainder
    size = (evidence.directory / "recording.bin").stat().st_size
    ship = shipper(s3, spool, chunk_bytes=1024, recording_delay=3600)
    ship.ship_once()
    sid = evidence.session_id
    assert len(recording_keys(s3, sid)) >= 5
    assert sum(verified) == size  # each byte once, not once per chunk shipped
    evidence.close({"ended_at": STARTED + 1})
    ship.ship_once()
    assert [r.payload for r in verified_records(s3, sid)] == payloads


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "live"])
def test_a_record_larger_than_one_read_still_ships(s3: Any, spool: Spool, monkeypatch: pytest.MonkeyPatch,
                                                   closed: bool) -> None:
    """A masked message can make one record of up to max_message_bytes, more than the shipper reads at once."""
    monkeypatch.setattr(shipper_module, "MAX_READ", 256)
    evidence = open_session(spool)
    payloads = record_some(evidence, count=2, size=40)
    big = b"m" * 3000
    evidence.record(FROM_SERVER, big)
    payloads += [big, *record_some(evidence, count=2, size=40)]
    if closed:
        evidence.close({"ended_at": STARTED + 1})
    shipper(s3, spool, chunk_bytes=1024, recording_delay=0).ship_once()
    records = verified_records(s3, evidence.session_id)
    assert [r.payload for r in records] == payloads
    assert evidence.directory.exists() is not closed


# ------------------------------------------------------------------------------------------------
# open and orphaned sessions
# ------------------------------------------------------------------------------------------------


def test_open_session_ships_its_events_but_stays_in_the_spool(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    sid = evidence.session_id
    first = [event_row(evidence, "connect", 1), event_row(evidence, "query", 2, statement="SELECT 1")]
    record_some(evidence)
    ship = shipper(s3, spool, recording_delay=3600)

    assert ship.ship_once() == 1
    assert shipped_rows(s3, sid) == json.loads(json.dumps(first))
    assert recording_keys(s3, sid) == []  # small and not yet due
    assert evidence.directory.exists()
    assert not s3.list_objects_v2(Bucket=EVIDENCE_BUCKET, Prefix=session_index_key(DT, REGION, sid)).get("Contents")

    assert ship.ship_once() == 0  # nothing new: nothing written

    last = event_row(evidence, "disconnect", 3)
    evidence.close({"ended_at": STARTED + 3})
    assert ship.ship_once() == 3
    assert len(event_keys(s3, sid)) == 2
    assert shipped_rows(s3, sid) == json.loads(json.dumps([*first, last]))  # no row twice
    assert len(verified_records(s3, sid)) == 3
    assert not evidence.directory.exists()


def test_open_session_recording_ships_once_it_is_due(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    record_some(evidence)
    assert shipper(s3, spool, recording_delay=0).ship_once() == 1
    assert len(verified_records(s3, evidence.session_id)) == 3
    assert evidence.directory.exists()
    evidence.close({"ended_at": STARTED + 1})


def test_a_live_recording_waits_its_delay_while_its_events_ship_every_round(
        s3: Any, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_800_000_000.0]
    monkeypatch.setattr("data_plane.shipper.time.time", lambda: clock[0])
    evidence = open_session(spool)
    sid = evidence.session_id
    ship = shipper(s3, spool, recording_delay=10)
    for second in range(10):  # a round a second, each with a new event: the recording is not due yet
        event_row(evidence, "query", second, statement=f"SELECT {second}")
        record_some(evidence, count=2)
        ship.ship_once()
        assert len(shipped_rows(s3, sid)) == second + 1 and recording_keys(s3, sid) == [], second
        clock[0] += 1
    ship.ship_once()  # ten seconds after the shipper first saw it
    assert len(verified_records(s3, sid)) == 20
    record_some(evidence, count=2)
    clock[0] += 9
    ship.ship_once()
    assert len(recording_keys(s3, sid)) == 1  # ten seconds from the last chunk
    evidence.close({"ended_at": STARTED + 1})
    ship.ship_once()  # a session's end ships the rest at once
    assert len(verified_records(s3, sid)) == 22 and not evidence.directory.exists()


def test_flush_ships_an_open_session_recording(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    record_some(evidence)
    shipper(s3, spool, recording_delay=3600).ship_once(flush=True)
    assert len(verified_records(s3, evidence.session_id)) == 3
    assert evidence.directory.exists()
    evidence.close({"ended_at": STARTED + 1})


def test_session_of_a_previous_gateway_instance_is_closed_as_failed_and_shipped(s3: Any, tmp_path: Path) -> None:
    old = Spool(tmp_path / "spool", fsync_interval=3600)
    evidence = open_session(old)
    sid = evidence.session_id
    connect = event_row(evidence, "connect", 1)
    payloads = record_some(evidence)
    evidence.recording.close()  # the old gateway died without closing the session
    os.close(evidence._events_fd)
    restarted = Spool(tmp_path / "spool", fsync_interval=3600)
    assert restarted.instance_id != old.instance_id

    # The chunk, the events (two date partitions: the disconnect is dated when it was noticed), the index.
    assert shipper(s3, restarted, recording_delay=3600).ship_once() == 4

    rows = shipped_rows(s3, sid)
    assert rows[0] == json.loads(json.dumps(connect))
    disconnect = rows[-1]
    assert (disconnect["activity_name"], disconnect["status"]) == ("disconnect", STATUS_FAILURE)
    assert disconnect["session_id"] == sid
    assert disconnect["src_ip"] == CLIENT_IP
    assert disconnect["class_uid"] == CLASS_DATASTORE_ACTIVITY[0]
    assert "terminated" in disconnect["status_detail"]
    assert [r.payload for r in verified_records(s3, sid)] == payloads
    row = index_row(s3, sid)
    assert row["ended_at"] is not None
    assert row["chunks"] == 1
    assert not evidence.directory.exists()


def test_open_session_of_the_current_instance_is_not_treated_as_orphaned(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    event_row(evidence, "connect", 1)
    shipper(s3, spool, recording_delay=3600).ship_once()
    assert [r["activity_name"] for r in shipped_rows(s3, evidence.session_id)] == ["connect"]
    assert not (evidence.directory / "closed").exists()
    evidence.close({"ended_at": STARTED + 1})


def test_half_created_session_without_meta_is_left_alone(s3: Any, spool: Spool) -> None:
    (spool.sessions_dir / "s-half").mkdir()
    assert shipper(s3, spool).ship_once() == 0
    assert (spool.sessions_dir / "s-half").exists()


def test_missing_spool_ships_nothing(s3: Any, tmp_path: Path) -> None:
    ship = Shipper(s3, tmp_path / "nowhere", recordings_bucket=RECORDINGS_BUCKET, evidence_bucket=EVIDENCE_BUCKET,
                   region=REGION)
    assert ship.ship_once() == 0


# ------------------------------------------------------------------------------------------------
# at least once, never twice per run
# ------------------------------------------------------------------------------------------------


def test_shipping_twice_writes_nothing_new(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    event_row(evidence, "connect", 1)
    record_some(evidence, count=10, size=200)
    evidence.close({"ended_at": STARTED + 1})
    ship = shipper(s3, spool, chunk_bytes=1024)
    ship.ship_once()
    sid = evidence.session_id
    before = (recording_keys(s3, sid), event_keys(s3, sid), len(shipped_rows(s3, sid)))
    assert ship.ship_once() == 0
    assert (recording_keys(s3, sid), event_keys(s3, sid), len(shipped_rows(s3, sid))) == before


def test_retry_after_lost_progress_rewrites_the_same_keys(s3: Any, spool: Spool) -> None:
    # A crash between S3 accepting an object and the progress file: the retry must not create new keys.
    evidence = open_session(spool)
    event_row(evidence, "connect", 1)
    record_some(evidence)
    ship = shipper(s3, spool, recording_delay=0)
    ship.ship_once()
    sid = evidence.session_id
    before = (recording_keys(s3, sid), event_keys(s3, sid))
    (evidence.directory / "shipped.json").unlink()
    ship.ship_once()
    assert (recording_keys(s3, sid), event_keys(s3, sid)) == before
    assert len(shipped_rows(s3, sid)) == 1
    evidence.close({"ended_at": STARTED + 1})


def test_backlog_counts_what_is_not_yet_shipped(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    event_row(evidence, "connect", 1)
    record_some(evidence)
    assert spool.backlog_bytes() > 0
    evidence.close({"ended_at": STARTED + 1})
    shipper(s3, spool).ship_once()
    assert spool.backlog_bytes() == 0


# ------------------------------------------------------------------------------------------------
# torn tails (a short write on a full disk, or a machine crash mid-record)
# ------------------------------------------------------------------------------------------------


def test_closed_session_with_a_torn_recording_tail_still_completes(s3: Any, spool: Spool) -> None:
    evidence = open_session(spool)
    payloads = record_some(evidence)
    evidence.close({"ended_at": STARTED + 1})
    with open(evidence.directory / "recording.bin", "ab") as fh:
        fh.write(b"\x00" * 10)  # a header cut short
    ship = shipper(s3, spool)
    ship.ship_once()
    ship.ship_once()
    assert [r.payload for r in verified_records(s3, evidence.session_id)] == payloads
    assert not evidence.directory.exists()
    assert index_row(s3, evidence.session_id)["chunks"] == 1


def test_orphaned_session_with_a_torn_events_line_still_ships(s3: Any, tmp_path: Path) -> None:
    old = Spool(tmp_path / "spool", fsync_interval=3600)
    evidence = open_session(old)
    connect = event_row(evidence, "connect", 1)
    os.write(evidence._events_fd, b'{"activity_name":"qu')  # the old gateway died mid-line
    evidence.recording.close()
    os.close(evidence._events_fd)
    restarted = Spool(tmp_path / "spool", fsync_interval=3600)
    shipper(s3, restarted).ship_once()
    rows = shipped_rows(s3, evidence.session_id)
    assert rows[0] == json.loads(json.dumps(connect))
    assert rows[-1]["activity_name"] == "disconnect"
    assert not evidence.directory.exists()


def test_a_live_session_written_in_place_ships_what_is_whole_and_waits_for_the_rest(s3: Any, spool: Spool) -> None:
    """The C data path copies into mapped spool files: a record may be half there (its header goes in
    last) and zeros not written yet follow; only what verifies, and whole lines, ship."""
    evidence = open_session(spool)
    connect = event_row(evidence, "connect", 1)
    payloads = record_some(evidence)
    with open(evidence.directory / "recording.bin", "ab") as fh:
        fh.write(bytes(22) + b"Q\x00\x00\x00\rSELECT 1\x00" + bytes(4096))
    with open(evidence.directory / "events.jsonl", "ab") as fh:
        fh.write(b'{"activity_name":"qu' + bytes(4096))
    shipper(s3, spool, recording_delay=0).ship_once()
    assert [r.payload for r in verified_records(s3, evidence.session_id)] == payloads
    assert shipped_rows(s3, evidence.session_id) == [json.loads(json.dumps(connect))]
    assert evidence.directory.exists()


def test_an_orphan_whose_files_end_in_unwritten_zeros_is_cut_back_and_ships_whole(s3: Any, tmp_path: Path) -> None:
    old = Spool(tmp_path / "spool", fsync_interval=3600)
    evidence = open_session(old)
    connect = event_row(evidence, "connect", 1)
    payloads = record_some(evidence)
    evidence.recording.close()  # the old gateway died with the session in its C data path, files mapped
    os.close(evidence._events_fd)
    for name in ("recording.bin", "events.jsonl"):
        with open(evidence.directory / name, "ab") as fh:
            fh.write(bytes(1 << 16))
    restarted = Spool(tmp_path / "spool", fsync_interval=3600)
    assert shipper(s3, restarted, recording_delay=3600).ship_once() == 4
    rows = shipped_rows(s3, evidence.session_id)
    assert rows[0] == json.loads(json.dumps(connect)) and len(rows) == 2
    assert rows[1]["activity_name"] == "disconnect"
    assert [r.payload for r in verified_records(s3, evidence.session_id)] == payloads
    row = index_row(s3, evidence.session_id)
    assert row["chunks"] == 1
    assert not evidence.directory.exists()


@pytest.mark.parametrize("size", [0, 1, 65_535, 65_536, 300_001])
def test_what_the_shipper_compresses_is_plain_gzip(size: int) -> None:
    """Whichever deflate is installed (ISA-L's or zlib's), the objects are gzip members any reader opens."""
    data = os.urandom(size // 2) + b"x" * (size - size // 2)
    assert gzip.decompress(gzip_member(data)) == data
    lines = GzipLines()
    for start in range(0, size, 7_001):
        lines.add(data[start:start + 7_001])
    assert gzip.decompress(lines.finish()) == data


def full_line(row: dict[str, Any]) -> bytes:
    """A full row as the C data path writes it: `time` first."""
    return orjson.dumps({"time": row["time"], **row}) + b"\n"


def test_full_rows_of_the_c_data_path_ship_as_written_by_day(s3: Any, spool: Spool) -> None:
    """Rows the C data path wrote whole are shipped without parsing, into their day's partition, beside
    compact rows the shipper expands."""
    evidence = open_session(spool)
    connect = event_row(evidence, "connect", 1)  # a row Python wrote: parsed and encoded again
    rows = [evidence_event(CLASS_DATASTORE_ACTIVITY, "query", region=REGION, now=STARTED + seconds,
                           session_id=evidence.session_id, statement=f"SELECT {seconds}", details={"n": seconds})
            for seconds in (30, 59, 61, 90)]  # 23:59:30 .. 00:00:30: two days
    for row in rows:
        os.write(evidence.events_fd, full_line(row))
    evidence.close({"ended_at": STARTED + 91})
    shipper(s3, spool).ship_once()
    shipped = shipped_rows(s3, evidence.session_id)
    expected = json.loads(json.dumps([connect, *rows]))
    assert sorted(shipped, key=lambda r: r["time"]) == sorted(expected, key=lambda r: r["time"])
    keys = event_keys(s3, evidence.session_id)
    assert {key.split("/")[1] for key in keys} == {"dt=2025-03-04", "dt=2025-03-05"}


def c_line(row: dict[str, Any], version: int) -> bytes:
    """A statement row as the C data path writes it (pgtrack.h): `time` first, the columns it sets and
    those it may set, then `,"tv":<version>}` where the shipper puts the template's other members."""
    mine = {"time": row["time"]} | {k: v for k, v in row.items() if k in C_ROW_SETS or k in C_ROW_MAY_SET}
    return orjson.dumps(mine)[:-1] + b',"tv":%d}' % version


@pytest.mark.parametrize("slice_bytes", [None, 1, 700], ids=["default", "each-line", "some-lines"])
def test_c_rows_ship_completed_with_their_session_s_template(s3: Any, spool: Spool, slice_bytes: int | None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The C data path's statement rows leave the template's members to the shipper, which takes them from
    the template file their `tv` names; what ships is the row Python's expansion makes, however the
    round's lines are cut into slices for completion."""
    if slice_bytes is not None:
        monkeypatch.setattr(shipper_module, "ROWS_SLICE_BYTES", slice_bytes)
    evidence = open_session(spool)
    expected = [event_row(evidence, "connect", 1)]
    for version, run_id in ((1, "run-1"), (2, "run-2")):  # a second grant mid-session: a second template
        template = EventTemplate((CLASS_DATASTORE_ACTIVITY[0], CLASS_DATASTORE_ACTIVITY[1]), region=REGION,
                                 session_id=evidence.session_id, src_ip=CLIENT_IP, pipeline_run_id=run_id)
        evidence.write_template(version, template.to_doc())
        for seconds in (30, 61):  # two days
            seq = len(expected) + 1
            compact = EventTemplate.compact("query", now=STARTED + seconds, statement=f"SELECT {seq}", seq=seq,
                                            details={"parameters": ["a\"b"]} if seq % 2 else None)
            row, _ = template.expand_line(compact, session_event_id(evidence.session_id, seq))
            os.write(evidence.events_fd, c_line(row, version) + b"\n")
            expected.append(row)
    evidence.close({"ended_at": STARTED + 91})
    shipper(s3, spool).ship_once()
    shipped = sorted(shipped_rows(s3, evidence.session_id), key=lambda r: r["seq"] or 0)
    assert shipped == json.loads(json.dumps(sorted(expected, key=lambda r: r["seq"] or 0)))
    assert {r["pipeline_run_id"] for r in shipped if r["activity_name"] == "query"} == {"run-1", "run-2"}
    assert {key.split("/")[1] for key in event_keys(s3, evidence.session_id)} == {"dt=2025-03-04", "dt=2025-03-05"}


def test_line_slices_cut_after_whole_lines() -> None:
    lines = [b"a" * 10 + b"\n", b"b" * 3 + b"\n", b"c" * 40 + b"\n", b"d\n"]
    data = b"".join(lines)
    for size in (1, 5, 11, 15, 16, 60, 1000):
        pieces = shipper_module.line_slices(data, size)
        assert b"".join(pieces) == data
        assert all(piece.endswith(b"\n") for piece in pieces)
        assert all(len(piece) <= size or piece.count(b"\n") == 1 for piece in pieces)  # longer: one line alone
    assert shipper_module.line_slices(data, 15) == [lines[0] + lines[1], lines[2], lines[3]]
    assert shipper_module.line_slices(b"", 15) == []


def test_the_c_and_python_full_row_runs_agree() -> None:
    lines = [orjson.dumps({"time": 86_400_000 * (i % 3) + i, "gateway_region": f"r{i % 4}", "x": "}"})
             for i in range(40)]
    lines += [b'{"time":5,"gateway_region":"a\\"b"}', b'{"time":5,"gateway_region":null}', b'{"time":-5,"x":1}',
              b'{"time":5,"gateway_region":"us"', b'{"activity_name":"query","time":5}', b"", b'{"time":7}']
    data = b"\n".join(lines) + b"\n"
    assert _recording is not None
    assert _recording.full_row_runs(data) == _full_row_runs_py(data)
    runs, others = _full_row_runs_py(data)
    assert len(runs) == 8 and sum(count for *_, count in runs) + len(others) == len(lines)


def test_the_c_and_python_completions_of_c_rows_agree() -> None:
    assert _recording is not None
    template = EventTemplate((CLASS_DATASTORE_ACTIVITY[0], CLASS_DATASTORE_ACTIVITY[1]), region="eu-west-1")
    rests = {1: c_row_parts(template)[0], 2: b',"gateway_region":"us-east-1","x":1', 3: b',"gateway_region":null',
             4: b',"gateway_region":"a\\"b"'}
    lines = [b'{"time":%d,"seq":%d,"statement":"x\\"}","tv":%d}' % (86_400_000 * (i % 2) + i, i, i % 6)
             for i in range(30)]  # versions 0 and 5 have no members: other lines, as 3 and 4 (no plain region)
    lines += [b'{"time":5,"tv":1}', b'{"time":5,"tv":}', b'{"time":5,"tv":1x}', b'{"time":5,"x":"tv":1}',
              b'{"time":5,"tv":%d}' % (10**19), b'{"time":5,"tv":01}', b'{"activity_name":"q","time":5,"tv":1}',
              b'{"time":5,"tv":2', b"", orjson.dumps({"time": 9, "gateway_region": "r"})]
    for data in (b"\n".join(lines) + b"\n", b"\n".join(lines)):
        for given in (rests, {}, None):
            assert _recording.full_row_runs(data, given) == _full_row_runs_py(data, given)
    runs, others = _recording.full_row_runs(b"\n".join(lines) + b"\n", rests)
    completed = [orjson.loads(line) for *_, found, _ in runs for line in found.splitlines()]
    assert sum(1 for row in completed if row.get("gateway_region") == "eu-west-1") == 5 + 2  # tv 1 and 01
    assert all("tv" not in row for row in completed)
    assert len(completed) + len(others) == len(lines)


def test_full_row_runs_take_rows_lying_together_as_they_are() -> None:
    assert _recording is not None

    def row(i: int, statement: str = "SELECT 1", tail: str = "us-east-1") -> bytes:
        # the rows' suffixes (the key's place from the end) are alike within a session, not across
        return b'{"time":%d,"statement":%s,"gateway_region":"%s","session_id":"%s"}' % (
            1_795_689_225_000 + i, orjson.dumps(statement), tail.encode(), b"s" * (i % 2 + 1))

    session = b"".join(row(i, "SELECT " + "x" * i) + b"\n" for i in range(50))
    runs, others = _recording.full_row_runs(session)
    assert others == [] and len(runs) == 1 and runs[0][2] is session and runs[0][3] == 50
    compact = b'{"seq":1,"activity_name":"connect","tv":1}\n'
    for data in (compact + session, compact + session + compact, session + row(99, tail="eu-west-1"),
                 session[:-1],  # the last line without its newline
                 session + row(1, tail="eu-west-1") + b"\n" + session,  # two regions, interleaved
                 b"".join(row(i, tail=f"r{i % 3}") + b"\n" for i in range(30))):
        assert _recording.full_row_runs(data) == _full_row_runs_py(data)
    runs, _ = _recording.full_row_runs(compact + session + compact)
    assert runs[0][2] == session


def test_event_times_format_like_isoformat_across_seconds_and_threads() -> None:
    start = 1_795_689_225_000
    for ms in (0, 999, 1_000, start - 1, start, start + 1, start + 999, start + 1_000, 4_102_444_799_999):
        assert iso_millis(ms) == datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds"), ms
    expected = {ms: datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
                for ms in range(start, start + 20_000, 7)}

    def check(offset: int) -> bool:  # threads alternating seconds must never see another second's text
        return all(iso_millis(ms) == text for ms, text in list(expected.items())[offset::4])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(4)))
