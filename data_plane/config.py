"""Gateway configuration: environment variables (the container's way) or a JSON file."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


def _boolean(name: str, raw: str) -> bool:
    """Strict: a typo must not silently turn a safety switch (TLS required) off."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"PROCTOR_{name.upper()} must be one of {'/'.join(_TRUE + _FALSE)}, not {raw!r}")


@dataclass(frozen=True)
class GatewayConfig:
    api_url: str
    region: str
    recordings_bucket: str
    evidence_bucket: str
    spool_dir: str
    pg_listen: str = "0.0.0.0:5432"
    admin_listen: str = "0.0.0.0:9090"
    tls_cert: str | None = None
    tls_key: str | None = None
    pg_require_tls: bool = True
    max_message_bytes: int = 128 << 20
    revocation_poll_seconds: float = 5.0
    drain_seconds: float = 30.0
    ship_interval_seconds: float = 2.0  # events ship every round…
    recording_ship_seconds: float = 10.0  # …a live session's recording when a chunk fills or after this long
    fsync_interval_seconds: float = 1.0
    backend_ca_file: str | None = None
    # The tenant's key for keyed-hash masking (HMAC-SHA256): equal values hash alike on every task.
    masking_hash_key: str | None = None
    backend_connect_timeout: float = 10.0
    run_shipper: bool = True
    event_loop: str = "uvloop"  # or "asyncio"
    # Sessions whose grant needs no masking are relayed by the C data path (data_plane.postgres.fastpath).
    fast_path: bool = True
    fast_path_workers: int = 0  # its relay threads; 0: one per CPU the process may run on
    # Its relay threads run under SCHED_BATCH: woken by a peer, they do not preempt the CPU's running task
    # (fewer context switches per round trip on busy CPUs; up to a scheduler slice later on a contended CPU).
    fast_path_batch_scheduling: bool = True
    api_region: str | None = None  # the control plane's region, when the gateway runs in another
    evidence_region: str | None = None  # the evidence buckets' region, likewise
    # The break-glass KMS key (id, alias or ARN) that seals the unmasked originals of masked results.
    breakglass_key_id: str | None = None
    sealed_rotate_bytes: int = 8 << 20  # a fresh data key after this many sealed bytes…
    sealed_rotate_seconds: float = 300.0  # …or this long

    @property
    def pg_address(self) -> tuple[str, int]:
        return _host_port(self.pg_listen)

    @property
    def admin_address(self) -> tuple[str, int]:
        return _host_port(self.admin_listen)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> GatewayConfig:
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("PROCTOR_" + f.name.upper())
            if raw is None:
                continue
            if f.type in ("bool", bool):
                values[f.name] = _boolean(f.name, raw)
            elif f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("float", float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        _materialize_pem(env, values)
        missing = [n for n in ("api_url", "region", "recordings_bucket", "evidence_bucket", "spool_dir")
                   if n not in values]
        if missing:
            raise ValueError("missing gateway settings: " + ", ".join("PROCTOR_" + n.upper() for n in missing))
        return cls(**values)

    @classmethod
    def from_file(cls, path: Path) -> GatewayConfig:
        return cls(**json.loads(path.read_text()))


def _materialize_pem(env: dict[str, str], values: dict[str, Any]) -> None:
    """In ECS the certificate and key arrive as secrets in the environment; ssl wants files."""
    cert, key = env.get("PROCTOR_TLS_CERT_PEM"), env.get("PROCTOR_TLS_KEY_PEM")
    if not (cert and key) or values.get("tls_cert"):
        return
    directory = Path(tempfile.mkdtemp(prefix="proctor-tls-"))
    for name, pem in (("tls_cert", cert), ("tls_key", key)):
        path = directory / f"{name}.pem"
        path.write_text(pem)
        path.chmod(0o600)
        values[name] = str(path)
