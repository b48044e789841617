"""The wire contract shared by the control plane and the gateways.

Grant claims, identity, and the evidence event schema and layout. No AWS imports: the data
plane depends on this module only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import time
import uuid
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt

try:  # ISA-L's deflate where installed (the gateway): at level 1 a sixth of zlib's time, for as good a ratio
    from isal import isal_zlib as _deflate
except ImportError:  # the control plane's Lambda layer: zlib
    _deflate = zlib  # type: ignore[assignment]
try:  # the gateway (its shipper) has orjson, several times faster; the control plane's Lambda layer does not
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    orjson = None  # type: ignore[assignment]

PRODUCT_NAME = "Proctor"
PRODUCT_VERSION = "0.1.0"
OCSF_VERSION = "1.1.0"

GRANT_ISSUER = "proctor"
GRANT_AUDIENCE = "proctor-gateway"
GRANT_ALGORITHM = "ES256"

TARGET_KINDS = ("postgres", "mysql", "ssh", "kubernetes")

# Claims of a pipeline's workload token that become part of the recorded identity.
PIPELINE_CLAIMS = ("repository", "workflow", "run_id", "run_attempt", "actor", "ref", "sha", "job")


@dataclass(frozen=True)
class Identity:
    """Who is asking: an authenticated person, or a pipeline run and the person who triggered it."""

    issuer: str
    subject: str
    groups: tuple[str, ...] = ()
    pipeline: Mapping[str, str] = field(default_factory=dict)
    email: str | None = None

    @property
    def kind(self) -> str:
        return "pipeline" if self.pipeline else "user"

    def to_dict(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "subject": self.subject,
            "groups": list(self.groups),
            "pipeline": dict(self.pipeline),
            "email": self.email,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Identity:
        return cls(
            issuer=str(data["issuer"]),
            subject=str(data["subject"]),
            groups=tuple(data.get("groups") or ()),
            pipeline={str(k): str(v) for k, v in (data.get("pipeline") or {}).items()},
            email=data.get("email"),
        )


@dataclass(frozen=True)
class GrantClaims:
    """What a grant JWT says. Signed by the control plane, verified offline by gateways."""

    grant_id: str
    identity: Identity
    target: str
    target_kind: str
    backend_role: str
    database: str | None
    policy_name: str
    policy_version: int
    issued_at: int
    expires_at: int
    reason: str = ""
    guardrails: tuple[Mapping[str, Any], ...] = ()
    masking: tuple[Mapping[str, Any], ...] = ()
    approvals: tuple[str, ...] = ()

    def to_jwt_claims(self) -> dict[str, Any]:
        return {
            "iss": GRANT_ISSUER,
            "aud": GRANT_AUDIENCE,
            "sub": self.identity.subject,
            "jti": self.grant_id,
            "iat": self.issued_at,
            "nbf": self.issued_at,
            "exp": self.expires_at,
            "idn": self.identity.to_dict(),
            "tgt": {"name": self.target, "kind": self.target_kind, "db": self.database},
            "role": self.backend_role,
            "pol": {"name": self.policy_name, "version": self.policy_version},
            "rules": {"guardrails": list(self.guardrails), "masking": list(self.masking)},
            "apr": list(self.approvals),
            "rsn": self.reason,
        }

    @classmethod
    def from_jwt_claims(cls, claims: Mapping[str, Any]) -> GrantClaims:
        target = claims["tgt"]
        policy = claims["pol"]
        rules = claims.get("rules") or {}
        return cls(
            grant_id=str(claims["jti"]),
            identity=Identity.from_dict(claims["idn"]),
            target=str(target["name"]),
            target_kind=str(target["kind"]),
            database=target.get("db"),
            backend_role=str(claims["role"]),
            policy_name=str(policy["name"]),
            policy_version=int(policy["version"]),
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
            reason=str(claims.get("rsn") or ""),
            guardrails=tuple(rules.get("guardrails") or ()),
            masking=tuple(rules.get("masking") or ()),
            approvals=tuple(claims.get("apr") or ()),
        )


# ---------------------------------------------------------------------------------------------
# Evidence events, shaped after OCSF classes. One flat row per event with fixed columns, so the
# Glue table (Athena) and the local DuckDB view read the same schema.
# ---------------------------------------------------------------------------------------------

CLASS_AUTHENTICATION = (3002, "Authentication")
CLASS_SSH_ACTIVITY = (4007, "SSH Activity")
CLASS_API_ACTIVITY = (6003, "API Activity")
CLASS_DATASTORE_ACTIVITY = (6005, "Datastore Activity")

# Activity names per class -> OCSF activity_id; Proctor's own verbs without an OCSF id are 99
# ("Other") and keep their name in activity_name.
ACTIVITIES: dict[int, dict[str, int]] = {
    3002: {"logon": 1, "logoff": 2, "authentication_ticket": 3},
    4007: {"open": 1, "close": 2, "fail": 4, "refuse": 5, "data": 6},
    6003: {"create": 1, "read": 2, "update": 3, "delete": 4},
    6005: {"read": 1, "update": 2, "connect": 3, "query": 4, "write": 5},
}

STATUS_SUCCESS = "Success"
STATUS_FAILURE = "Failure"

# (column, Athena/Hive type). Nested details that vary by event live in JSON strings
# (`actor_pipeline`, `details`) so the table never needs a schema change for a new field.
EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "string"),
    ("time", "bigint"),
    ("time_iso", "string"),
    ("class_uid", "int"),
    ("class_name", "string"),
    ("activity_id", "int"),
    ("activity_name", "string"),
    ("type_uid", "bigint"),
    ("status", "string"),
    ("status_detail", "string"),
    ("severity_id", "int"),
    ("actor_subject", "string"),
    ("actor_issuer", "string"),
    ("actor_kind", "string"),
    ("actor_groups", "array<string>"),
    ("actor_pipeline", "string"),
    ("pipeline_repository", "string"),
    ("pipeline_run_id", "string"),
    ("pipeline_actor", "string"),
    ("src_ip", "string"),
    ("src_port", "int"),
    ("target_name", "string"),
    ("target_kind", "string"),
    ("database_name", "string"),
    ("backend_user", "string"),
    ("session_id", "string"),
    ("seq", "bigint"),
    ("grant_id", "string"),
    ("policy_name", "string"),
    ("policy_version", "int"),
    ("api_operation", "string"),
    ("http_status", "int"),
    ("statement", "string"),
    ("command_tag", "string"),
    ("rows", "bigint"),
    ("bytes", "bigint"),
    ("duration_ms", "double"),
    ("sqlstate", "string"),
    ("approval_id", "string"),
    ("rule", "string"),
    ("details", "string"),
    ("product_version", "string"),
    ("gateway_region", "string"),
)
EVENT_COLUMN_NAMES = tuple(name for name, _ in EVENT_COLUMNS)
PARTITION_COLUMNS: tuple[tuple[str, str], ...] = (("dt", "string"), ("region", "string"))

# Session index rows (one per session, written at session end) for the `sessions` table.
SESSION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("session_id", "string"),
    ("protocol", "string"),
    ("started_at", "string"),
    ("ended_at", "string"),
    ("actor_subject", "string"),
    ("actor_kind", "string"),
    ("pipeline_repository", "string"),
    ("pipeline_run_id", "string"),
    ("pipeline_actor", "string"),
    ("target_name", "string"),
    ("database_name", "string"),
    ("backend_user", "string"),
    ("grant_id", "string"),
    ("src_ip", "string"),
    ("statements", "bigint"),
    ("bytes_in", "bigint"),
    ("bytes_out", "bigint"),
    ("chunks", "int"),
    ("last_hash", "string"),
    ("recording_prefix", "string"),
    ("gateway_region", "string"),
)

EVENTS_PREFIX = "events"
SESSIONS_PREFIX = "sessions"
RECORDINGS_PREFIX = "recordings"

# The unmasked originals of masked results are sealed under the break-glass KMS key with this
# encryption context (data_plane.core.sealed); the gateway's key permission is conditioned on it.
SEALED_CONTEXT_SESSION = "proctor:session"
SEALED_CONTEXT_PURPOSE = "proctor:purpose"
SEALED_PURPOSE = "unmasked-payload"


_COLUMN_SET = frozenset(EVENT_COLUMN_NAMES)


def new_event_id() -> str:
    return uuid.uuid4().hex


def _identity_fields(identity: Identity) -> dict[str, Any]:
    return {
        "actor_subject": identity.subject,
        "actor_issuer": identity.issuer,
        "actor_kind": identity.kind,
        "actor_groups": list(identity.groups),
        "actor_pipeline": json.dumps(dict(identity.pipeline), sort_keys=True) if identity.pipeline else None,
        "pipeline_repository": identity.pipeline.get("repository"),
        "pipeline_run_id": identity.pipeline.get("run_id"),
        "pipeline_actor": identity.pipeline.get("actor"),
    }


def _check_fields(fields: Mapping[str, Any]) -> None:
    if not _COLUMN_SET.issuperset(fields):
        raise ValueError(f"unknown evidence fields: {sorted(set(fields) - _COLUMN_SET)}")


class EventTemplate:
    """What a series of events shares (class, identity, region, session, target…), built once so
    that each event of a busy session costs a small dict: a gateway spools `compact` rows (only
    what varies) next to the template's `to_doc()`, and the shipper `expand`s them into full rows."""

    __slots__ = ("_activities", "_base", "_class_name", "_class_uid")

    def __init__(self, event_class: tuple[int, str], *, identity: Identity | None = None, region: str = "",
                 **fields: Any) -> None:
        class_uid, class_name = event_class
        _check_fields(fields)
        base: dict[str, Any] = dict.fromkeys(EVENT_COLUMN_NAMES)
        base.update(class_uid=class_uid, class_name=class_name, product_version=PRODUCT_VERSION,
                    gateway_region=region, actor_groups=[])
        if identity is not None:
            base.update(_identity_fields(identity))
        base.update(fields)
        self._base = _sorted(base)
        self._class_uid = class_uid
        self._class_name = class_name
        self._activities = ACTIVITIES[class_uid]

    def to_doc(self) -> dict[str, Any]:
        return {"class": [self._class_uid, self._class_name], "base": self._base}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> EventTemplate:
        template = cls((int(doc["class"][0]), str(doc["class"][1])))
        template._base.update({k: v for k, v in doc["base"].items() if k in _COLUMN_SET})
        template._base = _sorted(template._base)
        return template

    @staticmethod
    def compact(activity: str, *, status: str = STATUS_SUCCESS, now: float | None = None,
                details: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Only what varies per event; `expand` turns it into the full row (the compact row does not
        depend on the template, so a session need not keep its template to build one)."""
        _check_fields(fields)
        fields["activity_name"] = activity
        fields["status"] = status
        fields["time"] = int((time.time() if now is None else now) * 1000)
        if details:
            fields["details"] = details
        return fields

    def expand(self, compact: Mapping[str, Any], event_id: str) -> dict[str, Any]:
        row = self._base.copy()
        row.update(compact)
        activity_id = self._activities.get(row["activity_name"], 99)
        details = row.get("details")
        row.update(
            event_id=event_id,
            time_iso=iso_millis(row["time"]),
            activity_id=activity_id,
            type_uid=self._class_uid * 100 + activity_id,
            severity_id=1 if row["status"] == STATUS_SUCCESS else 3,
            details=details if details is None or isinstance(details, str) else details_text(details),
        )
        return row

    def expand_line(self, compact: Mapping[str, Any], event_id: str) -> tuple[dict[str, Any], bytes]:
        """The full row and `jsonl_line` of it, without sorting the keys of every row: the base is in
        key order, and a row of known columns keeps that order."""
        row = self.expand(compact, event_id)
        if len(row) == len(self._base) and orjson is not None:
            try:
                return row, orjson.dumps(row, default=str, option=_ORJSON_UNSORTED)
            except TypeError:
                pass
        return row, jsonl_line(row)

    def fixed_parts(self, activity: str, sets: Collection[str], may_set: Sequence[str],
                    ) -> tuple[bytes, tuple[bytes, ...]]:
        """For rows of `activity` written whole elsewhere (the C data path's, pgtrack.h's pgt_full), which
        set the columns `sets` themselves and each of `may_set` or not: the `,"column":value` members of
        every other column, and those of each of `may_set` for a row without it, as `expand` fills them."""
        assert orjson is not None, "full rows are written where orjson is installed (the gateway)"
        activity_id = self._activities.get(activity, 99)
        row = dict(self._base, activity_id=activity_id, type_uid=self._class_uid * 100 + activity_id)
        if row.get("details") is not None and not isinstance(row["details"], str):
            row["details"] = details_text(row["details"])

        def member(column: str) -> bytes:
            return b"," + orjson.dumps(column) + b":" + orjson.dumps(row[column], default=str, option=_ORJSON_DETAILS)

        rest = b"".join(member(column) for column in row if column not in sets and column not in may_set)
        return rest, tuple(member(column) for column in may_set)

    def row(self, activity: str, *, status: str = STATUS_SUCCESS, now: float | None = None,
            details: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """One evidence row. Unknown field names are a programming error."""
        return self.expand(self.compact(activity, status=status, now=now, details=details, **fields),
                           new_event_id())


def _sorted(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {key: fields[key] for key in sorted(fields)}


def details_text(details: Mapping[str, Any]) -> str:
    """The `details` column: the details as compact JSON, keys sorted (orjson where it is installed,
    json elsewhere: the same JSON values either way)."""
    if orjson is not None:
        try:
            return orjson.dumps(details, default=str, option=_ORJSON_DETAILS).decode()
        except TypeError:  # what orjson refuses (integers beyond 64 bits, lone surrogates): json's way
            pass
    return json.dumps(details, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)

_last_second: tuple[int, str] = (-1, "")  # the last whole second formatted: a busy session's rows share it


def iso_millis(ms: int) -> str:
    """`datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")`, formatting the date
    and time once per second rather than once per row (the shipper expands thousands a second)."""
    global _last_second
    second, millis = divmod(int(ms), 1000)
    cached_second, text = _last_second  # one tuple: another thread replaces it whole
    if cached_second != second:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (second, text)
    return f"{text}.{millis:03d}+00:00"


def session_event_id(session_id: str, seq: int) -> str:
    """Event ids of session events are a function of (session, sequence): a re-shipped event keeps
    its id, so de-duplication by event_id is exact. SHA-256, as the C data path computes it too
    (pgtrack.h's full rows)."""
    return hashlib.sha256(f"{session_id}:{seq}".encode()).hexdigest()[:32]


def evidence_event(
    event_class: tuple[int, str],
    activity: str,
    *,
    status: str = STATUS_SUCCESS,
    identity: Identity | None = None,
    now: float | None = None,
    region: str = "",
    details: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Build one evidence row (fields given here override the identity's)."""
    return EventTemplate(event_class, identity=identity, region=region).row(
        activity, status=status, now=now, details=details, **fields)


DAY_MS = 86_400_000
_dates: dict[int, str] = {}  # day number -> "YYYY-MM-DD": a batch of events spans a day or two


def event_partition(row: Mapping[str, Any]) -> tuple[str, str]:
    """(dt, region) partition of an event row."""
    return partition_of(int(row["time"]), str(row.get("gateway_region") or "global"))


# The columns the C data path's statement rows (pgtrack.h) set themselves, and, in pgt_full's order,
# those they may set.
C_ROW_SETS = frozenset({"time", "activity_name", "status", "statement", "command_tag", "rows", "bytes",
                        "duration_ms", "seq", "event_id", "time_iso", "severity_id"})
C_ROW_MAY_SET = ("sqlstate", "status_detail", "rule", "approval_id", "details")


def c_row_parts(template: EventTemplate) -> tuple[bytes, tuple[bytes, ...]]:
    """What the C data path's statement rows of a session leave out and take from `template`: the
    `,"column":value` members of every column they do not set (the same in every row: the shipper
    splices them in place of a row's closing `,"tv":N`), and those of each column they may set, for
    rows without it (the C tracker writes these)."""
    return template.fixed_parts("query", C_ROW_SETS, C_ROW_MAY_SET)


def c_row_key(line: bytes) -> tuple[int, int, int] | None:
    """(time, template version, where its closing `,"tv":` starts) of a statement row's JSON line as the
    C data path writes it (pgtrack.h: `time` first, `,"tv":<version>` last, the template's members left
    to the shipper), read without parsing it; None for any other line (Python's compact rows start with
    `activity_name`)."""
    comma = line.find(b",", 8)
    if comma < 0 or not line.startswith(b'{"time":') or not line.endswith(b"}") or not line[8:comma].isdigit():
        return None
    at = line.rfind(b',"tv":')
    if at < comma or not line[at + 6:-1].isdigit():
        return None
    return int(line[8:comma]), int(line[at + 6:-1]), at


def full_row_key(line: bytes) -> tuple[int, bytes] | None:
    """(time, region) of a full row's JSON line as the C data path writes it (pgtrack.h: `time`
    first, a plain `gateway_region`), read without parsing it; None for any other line. The spool
    holds no torn line of the C data path's: a failed write is cut off before anything follows it
    (_spoolmap.h), and the shipper drops a dead gateway's unfinished last line."""
    comma = line.find(b",", 8)
    if comma < 0 or not line.startswith(b'{"time":') or not line.endswith(b"}") or not line[8:comma].isdigit():
        return None
    at = line.find(b',"gateway_region":"', comma)
    if at < 0:
        return None
    start = at + 19
    stop = line.find(b'"', start)
    if stop < 0 or b"\\" in line[start:stop]:
        return None
    return int(line[8:comma]), line[start:stop]


def partition_of(time_ms: int, region: str) -> tuple[str, str]:
    day = time_ms // DAY_MS
    dt = _dates.get(day)
    if dt is None:
        if len(_dates) > 1024:
            _dates.clear()
        dt = _dates[day] = datetime.fromtimestamp(day * (DAY_MS // 1000), UTC).strftime("%Y-%m-%d")
    return dt, region


def event_object_key(dt: str, region: str, batch_id: str, prefix: str = EVENTS_PREFIX) -> str:
    return f"{prefix}/dt={dt}/region={region}/{batch_id}.jsonl.gz"


if orjson is not None:
    # What json.dumps(default=str) would write as str() goes to default=str here too.
    _ORJSON_DETAILS = (orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
                       | orjson.OPT_PASSTHROUGH_DATACLASS)
    _ORJSON_OPTIONS = _ORJSON_DETAILS | orjson.OPT_APPEND_NEWLINE
    _ORJSON_UNSORTED = _ORJSON_OPTIONS & ~orjson.OPT_SORT_KEYS


def jsonl_line(row: Mapping[str, Any]) -> bytes:
    """One row as a JSON line, keys sorted: orjson where it is installed, json elsewhere; the
    same JSON values either way."""
    if orjson is not None:
        try:
            return orjson.dumps(row, default=str, option=_ORJSON_OPTIONS)
        except TypeError:  # what orjson refuses (integers beyond 64 bits, lone surrogates): json's way
            pass
    return (json.dumps(row, sort_keys=True, default=str, separators=(",", ":")) + "\n").encode()


class GzipLines:
    """A gzip member written as lines arrive, so what waits to be uploaded is compressed bytes,
    never the rows. mtime 0 keeps the bytes a pure function of the lines (digests reproducible, for
    one deflate implementation). Level 1: the gateway's shipper compresses every statement's row on
    the cores the relay uses; on statement rows (~1.1 KB, long runs of shared columns) zlib's level 1
    takes 2.0 µs a row (a third of its level 6's time, for objects 28% larger), ISA-L's 0.3 µs, and
    compresses them better (24:1 against 22:1)."""

    LEVEL = 1

    def __init__(self) -> None:
        self._compress = _deflate.compressobj(self.LEVEL, _deflate.DEFLATED, -_deflate.MAX_WBITS)
        # magic, deflate, no flags, mtime 0, "fastest" (level 1), OS unknown: as gzip.compress writes it
        self._out = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"]
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._crc = 0
        self._size = 0

    def add(self, line: bytes | memoryview) -> None:
        self._pending.append(line)
        self._pending_size += len(line)
        if self._pending_size >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        self._crc = _deflate.crc32(data, self._crc)
        self._size += len(data)
        self._out.append(self._compress.compress(data))

    def finish(self) -> bytes:
        self._flush()
        self._out.append(self._compress.flush())
        self._out.append(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        return b"".join(self._out)


def gzip_member(data: bytes | memoryview) -> bytes:
    """`gzip.compress(data, compresslevel=1, mtime=0)`, on the deflate GzipLines uses."""
    member = GzipLines()
    member.add(data)
    return member.finish()


def encode_jsonl_gz(rows: Iterable[Mapping[str, Any]]) -> bytes:
    lines = GzipLines()
    for row in rows:
        lines.add(jsonl_line(row))
    return lines.finish()


def decode_jsonl_gz(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line]


def new_batch_id(now: float | None = None) -> str:
    """Sortable batch/object id: UTC timestamp then randomness."""
    ts = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return f"{ts:%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex[:12]}"


def recording_chunk_key(dt: str, session_id: str, chunk_no: int) -> str:
    return f"{RECORDINGS_PREFIX}/dt={dt}/{session_id}/{chunk_no:06d}.rec.gz"


def session_index_key(dt: str, region: str, session_id: str) -> str:
    return f"{SESSIONS_PREFIX}/dt={dt}/region={region}/{session_id}.jsonl.gz"


# ---------------------------------------------------------------------------------------------
# Grant verification: the one verifier, used by the control plane (credential issuance) and by
# every gateway (offline, against the published grant keys).
# ---------------------------------------------------------------------------------------------


class GrantInvalid(Exception):
    """The grant cannot be accepted; the message is safe to show to the client."""


class UnknownGrantKey(GrantInvalid):
    """The grant names a key id the verifier does not hold (refresh the key set, then retry once)."""


class GrantKeySet:
    """Public grant-verification keys from a JWKS document, by key id."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys: dict[str, Any] = {}
        for jwk in jwks.get("keys", []):
            if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or "kid" not in jwk:
                continue
            self._keys[str(jwk["kid"])] = jwt.PyJWK(dict(jwk), algorithm=GRANT_ALGORITHM).key

    def get(self, kid: str) -> Any | None:
        return self._keys.get(kid)

    def __len__(self) -> int:
        return len(self._keys)


def verify_grant(token: str, keys: GrantKeySet, *, leeway: int = 5) -> GrantClaims:
    """Verify a grant JWT's signature (ES256 only), audience, issuer and lifetime."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise GrantInvalid("grant is not a valid JWT") from exc
    if header.get("alg") != GRANT_ALGORITHM:
        raise GrantInvalid("grant algorithm not allowed")
    kid = header.get("kid")
    key = keys.get(str(kid)) if kid else None
    if key is None:
        raise UnknownGrantKey("grant signed by an unknown key")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[GRANT_ALGORITHM],
            audience=GRANT_AUDIENCE,
            issuer=GRANT_ISSUER,
            leeway=leeway,
            options={"require": ["exp", "iat", "nbf", "jti", "sub", "aud", "iss"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise GrantInvalid("grant expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise GrantInvalid("grant not yet valid") from exc
    except jwt.InvalidSignatureError as exc:
        raise GrantInvalid("grant signature invalid") from exc
    except jwt.PyJWTError as exc:
        raise GrantInvalid(f"grant rejected: {exc}") from exc
    try:
        return GrantClaims.from_jwt_claims(claims)
    except (KeyError, TypeError, ValueError) as exc:
        raise GrantInvalid("grant claims malformed") from exc


def put_evidence_object(s3: Any, bucket: str, key: str, body: bytes) -> None:
    """Write one evidence object. The SHA-256 checksum is checked by S3 and kept with the object;
    the bucket's default Object Lock retention applies."""
    s3.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256",
                  ContentType="application/x-ndjson", ContentEncoding="gzip")


class EventBatch:
    """Audit events on their way to the evidence bucket: one gzip JSON-lines object per (date,
    region) partition, each row encoded and compressed as it is added (a big batch holds compressed
    bytes, not rows)."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, str], GzipLines] = {}
        self.rows = 0
        self.first_time: int | None = None  # the earliest row's time (ms)

    def add(self, row: Mapping[str, Any], line: bytes | None = None) -> None:
        """Adds the row; `line` is a JSON line of it when the caller has one already."""
        self._add(event_partition(row), jsonl_line(row) if line is None else line, int(row["time"]), 1)

    def add_run(self, first_time: int, region: str, lines: bytes, count: int) -> None:
        """Adds `count` JSON lines (each ending in a newline) of one partition as they are: full rows
        the C data path wrote (see full_row_key), the earliest at `first_time`."""
        self._add(partition_of(first_time, region or "global"), lines, first_time, count)

    def _add(self, partition: tuple[str, str], lines: bytes, first_time: int, count: int) -> None:
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = GzipLines()
        part.add(lines)
        self.first_time = first_time if self.first_time is None else min(self.first_time, first_time)
        self.rows += count

    @property
    def partitions(self) -> list[tuple[str, str]]:
        return sorted(self._parts)

    def write(self, s3: Any, bucket: str, batch_id: str) -> list[str]:
        keys = []
        for dt, region in self.partitions:
            key = event_object_key(dt, region, batch_id)
            put_evidence_object(s3, bucket, key, self._parts[(dt, region)].finish())
            keys.append(key)
        return keys


def write_event_batch(s3: Any, bucket: str, rows: Iterable[Mapping[str, Any]],
                      *, batch_id: str | None = None) -> list[str]:
    """The one writer of audit events: one gzip JSON-lines object per (date, region) partition.
    `s3` is a boto3 S3 client (duck-typed here so this module stays free of AWS imports)."""
    batch = EventBatch()
    for row in rows:
        batch.add(row)
    return batch.write(s3, bucket, batch_id or new_batch_id())
