"""Gateway configuration from the container's environment: every setting has a PROCTOR_ variable,
values are typed, missing essentials are named, and PEM secrets become private files."""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path

import pytest

from data_plane.config import GatewayConfig

REQUIRED = {
    "PROCTOR_API_URL": "https://api.example.test/v1",
    "PROCTOR_REGION": "eu-west-1",
    "PROCTOR_RECORDINGS_BUCKET": "rec-bucket",
    "PROCTOR_EVIDENCE_BUCKET": "ev-bucket",
    "PROCTOR_SPOOL_DIR": "/var/spool/proctor",
}
CERT_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMIIEfake\n-----END PRIVATE KEY-----\n"


def test_required_settings_alone_give_the_documented_defaults() -> None:
    config = GatewayConfig.from_env(dict(REQUIRED))
    assert config.api_url == "https://api.example.test/v1"
    assert config.region == "eu-west-1"
    assert config.recordings_bucket == "rec-bucket"
    assert config.evidence_bucket == "ev-bucket"
    assert config.spool_dir == "/var/spool/proctor"
    assert config.pg_address == ("0.0.0.0", 5432)
    assert config.admin_address == ("0.0.0.0", 9090)
    assert config.tls_cert is None
    assert config.tls_key is None
    assert config.pg_require_tls is True
    assert config.run_shipper is True


def test_every_setting_is_read_from_its_variable_with_its_type() -> None:
    env = dict(REQUIRED,
               PROCTOR_PG_LISTEN="127.0.0.1:15432",
               PROCTOR_ADMIN_LISTEN=":19090",
               PROCTOR_TLS_CERT="/etc/proctor/cert.pem",
               PROCTOR_TLS_KEY="/etc/proctor/key.pem",
               PROCTOR_PG_REQUIRE_TLS="false",
               PROCTOR_MAX_MESSAGE_BYTES="1048576",
               PROCTOR_REVOCATION_POLL_SECONDS="0.5",
               PROCTOR_DRAIN_SECONDS="12",
               PROCTOR_SHIP_INTERVAL_SECONDS="2.5",
               PROCTOR_RECORDING_SHIP_SECONDS="30",
               PROCTOR_FSYNC_INTERVAL_SECONDS="0.25",
               PROCTOR_BACKEND_CA_FILE="/etc/ssl/rds.pem",
               PROCTOR_BACKEND_CONNECT_TIMEOUT="3",
               PROCTOR_RUN_SHIPPER="0",
               PROCTOR_FAST_PATH_WORKERS="3",
               PROCTOR_FAST_PATH_BATCH_SCHEDULING="false",
               UNRELATED="ignored")
    config = GatewayConfig.from_env(env)
    assert config == GatewayConfig(
        api_url="https://api.example.test/v1", region="eu-west-1", recordings_bucket="rec-bucket",
        evidence_bucket="ev-bucket", spool_dir="/var/spool/proctor", pg_listen="127.0.0.1:15432",
        admin_listen=":19090", tls_cert="/etc/proctor/cert.pem", tls_key="/etc/proctor/key.pem",
        pg_require_tls=False, max_message_bytes=1048576, revocation_poll_seconds=0.5, drain_seconds=12.0,
        ship_interval_seconds=2.5, recording_ship_seconds=30.0, fsync_interval_seconds=0.25,
        backend_ca_file="/etc/ssl/rds.pem", backend_connect_timeout=3.0, run_shipper=False, fast_path_workers=3,
        fast_path_batch_scheduling=False)
    assert type(config.max_message_bytes) is int
    assert type(config.drain_seconds) is float
    assert config.pg_address == ("127.0.0.1", 15432)
    assert config.admin_address == ("0.0.0.0", 19090)


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("true", True), ("TRUE", True), (" yes ", True),
                                            ("on", True), ("0", False), ("false", False), ("No", False),
                                            ("off", False)])
def test_booleans_accept_the_usual_spellings(raw: str, value: bool) -> None:
    config = GatewayConfig.from_env(dict(REQUIRED, PROCTOR_PG_REQUIRE_TLS=raw, PROCTOR_RUN_SHIPPER=raw))
    assert config.pg_require_tls is value
    assert config.run_shipper is value


@pytest.mark.parametrize("raw", ["ture", "enabled", "required"])
def test_unrecognised_boolean_is_refused_rather_than_read_as_false(raw: str) -> None:
    with pytest.raises(ValueError):
        GatewayConfig.from_env(dict(REQUIRED, PROCTOR_PG_REQUIRE_TLS=raw))


@pytest.mark.parametrize(("name", "raw"), [("PROCTOR_MAX_MESSAGE_BYTES", "lots"), ("PROCTOR_DRAIN_SECONDS", "soon"),
                                           ("PROCTOR_MAX_MESSAGE_BYTES", "1.5")])
def test_unparseable_numbers_are_refused(name: str, raw: str) -> None:
    with pytest.raises(ValueError):
        GatewayConfig.from_env(dict(REQUIRED, **{name: raw}))


def test_missing_required_settings_are_all_named() -> None:
    env = {k: v for k, v in REQUIRED.items() if k not in ("PROCTOR_REGION", "PROCTOR_SPOOL_DIR")}
    with pytest.raises(ValueError, match="missing gateway settings") as caught:
        GatewayConfig.from_env(env)
    message = str(caught.value)
    assert "PROCTOR_REGION" in message
    assert "PROCTOR_SPOOL_DIR" in message
    assert "PROCTOR_API_URL" not in message


def test_empty_environment_names_every_required_setting() -> None:
    with pytest.raises(ValueError) as caught:
        GatewayConfig.from_env({})
    for name in REQUIRED:
        assert name in str(caught.value)


def test_from_env_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PROCTOR_DRAIN_SECONDS", "7")
    assert GatewayConfig.from_env().drain_seconds == 7.0


def test_pem_variables_become_private_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = GatewayConfig.from_env(dict(REQUIRED, PROCTOR_TLS_CERT_PEM=CERT_PEM, PROCTOR_TLS_KEY_PEM=KEY_PEM))
    assert config.tls_cert is not None
    assert config.tls_key is not None
    cert, key = Path(config.tls_cert), Path(config.tls_key)
    assert cert.read_text() == CERT_PEM
    assert key.read_text() == KEY_PEM
    assert stat.S_IMODE(cert.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert cert.parent == key.parent
    assert tmp_path in key.parents


def test_each_process_gets_its_own_pem_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env = dict(REQUIRED, PROCTOR_TLS_CERT_PEM=CERT_PEM, PROCTOR_TLS_KEY_PEM=KEY_PEM)
    assert GatewayConfig.from_env(env).tls_key != GatewayConfig.from_env(env).tls_key


def test_explicit_certificate_files_win_over_pem_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = GatewayConfig.from_env(dict(REQUIRED, PROCTOR_TLS_CERT="/etc/c.pem", PROCTOR_TLS_KEY="/etc/k.pem",
                                         PROCTOR_TLS_CERT_PEM=CERT_PEM, PROCTOR_TLS_KEY_PEM=KEY_PEM))
    assert (config.tls_cert, config.tls_key) == ("/etc/c.pem", "/etc/k.pem")
    assert list(tmp_path.iterdir()) == []


def test_a_certificate_without_its_key_is_not_materialized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = GatewayConfig.from_env(dict(REQUIRED, PROCTOR_TLS_CERT_PEM=CERT_PEM))
    assert config.tls_cert is None
    assert config.tls_key is None
    assert list(tmp_path.iterdir()) == []


def test_bracketed_ipv6_listen_address_is_unbracketed() -> None:
    config = GatewayConfig.from_env(dict(REQUIRED, PROCTOR_PG_LISTEN="[::]:5432", PROCTOR_ADMIN_LISTEN="[::1]:9090"))
    assert config.pg_address == ("::", 5432)
    assert config.admin_address == ("::1", 9090)


def test_from_file_reads_the_same_fields(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text('{"api_url": "http://127.0.0.1:8000", "region": "local", "recordings_bucket": "r",'
                    ' "evidence_bucket": "e", "spool_dir": "/tmp/s", "pg_listen": "127.0.0.1:6432",'
                    ' "run_shipper": false}')
    config = GatewayConfig.from_file(path)
    assert config.pg_address == ("127.0.0.1", 6432)
    assert config.run_shipper is False
