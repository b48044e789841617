"""The gateway's backend login: SCRAM-SHA-256 against RFC 7677's test vector and against an
independent computation of PostgreSQL's `n=` form, the refusals that protect against a fake
server, and MD5 as PostgreSQL documents it."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from data_plane.postgres.auth import SCRAM_SHA_256, BackendAuthError, ScramClient, md5_password

# RFC 7677 section 3.
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_CLIENT_FIRST_BARE = "n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_client() -> ScramClient:
    """A client whose nonce and client-first-bare are the RFC's (it names user "user";
    PostgreSQL's clients send `n=`)."""
    client = ScramClient(RFC_PASSWORD)
    client._nonce = RFC_CLIENT_NONCE
    client._client_first_bare = RFC_CLIENT_FIRST_BARE
    return client


def scram_server_side(password: str, client_first_bare: str, server_first: str,
                      final_without_proof: str) -> tuple[str, str]:
    """(expected proof, server signature), computed straight from RFC 5802 section 3."""
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    auth_message = f"{client_first_bare},{server_first},{final_without_proof}".encode()
    client_signature = hmac.digest(stored_key, auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    signature = hmac.digest(server_key, auth_message, "sha256")
    return base64.b64encode(proof).decode(), base64.b64encode(signature).decode()


def pg_exchange(password: str) -> tuple[ScramClient, str, bytes]:
    """A client, its nonce as sent in client-first, and a server-first extending it."""
    client = ScramClient(password)
    first = client.client_first().decode()
    nonce = first.split("r=", 1)[1]
    salt = base64.b64encode(b"pg-salt-16-bytes").decode()
    return client, nonce, f"r={nonce}ServerPart+/=,s={salt},i=64".encode()


# ------------------------------------------------------------------------------------------------
# the math
# ------------------------------------------------------------------------------------------------


def test_mechanism_name_is_scram_sha_256() -> None:
    assert SCRAM_SHA_256 == "SCRAM-SHA-256"


def test_client_final_matches_the_rfc_7677_test_vector() -> None:
    assert rfc_client().client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL


def test_rfc_7677_server_final_is_accepted() -> None:
    client = rfc_client()
    client.client_final(RFC_SERVER_FIRST)
    client.verify_server_final(RFC_SERVER_FINAL)  # does not raise


def test_the_independent_computation_reproduces_the_rfc_vector() -> None:
    # Guards the helper the PostgreSQL-form tests rely on.
    proof, signature = scram_server_side(RFC_PASSWORD, RFC_CLIENT_FIRST_BARE, RFC_SERVER_FIRST.decode(),
                                         RFC_CLIENT_FINAL.decode().rsplit(",p=", 1)[0])
    assert f"p={proof}".encode() == RFC_CLIENT_FINAL.rsplit(b",", 1)[1]
    assert f"v={signature}".encode() == RFC_SERVER_FINAL


def test_client_first_uses_postgresql_empty_user_and_no_channel_binding() -> None:
    first = ScramClient("pw").client_first().decode()
    assert first.startswith("n,,n=,r=")
    nonce = first.removeprefix("n,,n=,r=")
    assert len(nonce) >= 18
    assert "," not in nonce
    assert base64.b64decode(nonce)  # printable, from the base64 alphabet


def test_each_client_has_its_own_nonce() -> None:
    assert ScramClient("pw").client_first() != ScramClient("pw").client_first()


def test_postgresql_form_proof_and_server_signature_match_an_independent_computation() -> None:
    client, nonce, server_first = pg_exchange("correct horse")
    final = client.client_final(server_first).decode()
    without_proof, _, proof = final.rpartition(",p=")
    assert without_proof == f"c=biws,r={nonce}ServerPart+/="
    expected_proof, signature = scram_server_side("correct horse", f"n=,r={nonce}", server_first.decode(),
                                                  without_proof)
    assert proof == expected_proof
    client.verify_server_final(f"v={signature}".encode())


def test_a_different_password_gives_a_different_proof() -> None:
    client, nonce, server_first = pg_exchange("correct horse")
    proof = client.client_final(server_first).decode().rpartition(",p=")[2]
    wrong, _ = scram_server_side("wrong horse", f"n=,r={nonce}", server_first.decode(),
                                 f"c=biws,r={nonce}ServerPart+/=")
    assert proof != wrong


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------


def test_server_nonce_not_extending_the_client_nonce_is_refused() -> None:
    client = ScramClient("pw")
    with pytest.raises(BackendAuthError, match="nonce"):
        client.client_final(b"r=someoneElsesNonce,s=c2FsdA==,i=4096")


def test_server_echoing_only_a_prefix_of_the_client_nonce_is_refused() -> None:
    client, nonce, _ = pg_exchange("pw")
    with pytest.raises(BackendAuthError):
        client.client_final(f"r={nonce[:-1]},s=c2FsdA==,i=4096".encode())


@pytest.mark.parametrize("iterations", ["0", "-1"])
def test_iteration_count_below_one_is_refused(iterations: str) -> None:
    client, nonce, _ = pg_exchange("pw")
    with pytest.raises(BackendAuthError, match="iteration"):
        client.client_final(f"r={nonce}x,s=c2FsdA==,i={iterations}".encode())


@pytest.mark.parametrize("server_first", ["r={nonce}x,i=4096", "r={nonce}x,s=c2FsdA==", "s=c2FsdA==,i=4096",
                                          "r={nonce}x,s=c2FsdA==,i=many"])
def test_server_first_missing_or_garbling_an_attribute_is_refused(server_first: str) -> None:
    client, nonce, _ = pg_exchange("pw")
    with pytest.raises(BackendAuthError, match="malformed"):
        client.client_final(server_first.format(nonce=nonce).encode())


def test_server_first_with_an_attribute_lacking_equals_is_refused() -> None:
    client, nonce, _ = pg_exchange("pw")
    with pytest.raises(BackendAuthError):
        client.client_final(f"r={nonce}x,s=c2FsdA==,i=4096,garbage".encode())


def test_wrong_server_signature_is_refused() -> None:
    client = rfc_client()
    client.client_final(RFC_SERVER_FIRST)
    forged = base64.b64encode(b"\x00" * 32)
    with pytest.raises(BackendAuthError, match="signature"):
        client.verify_server_final(b"v=" + forged)


def test_server_final_without_a_verifier_is_refused() -> None:
    client = rfc_client()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(BackendAuthError):
        client.verify_server_final(b"")


def test_server_final_before_client_final_is_refused() -> None:
    with pytest.raises(BackendAuthError):
        ScramClient(RFC_PASSWORD).verify_server_final(RFC_SERVER_FINAL)


def test_server_error_attribute_is_refused_with_its_reason() -> None:
    client = rfc_client()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(BackendAuthError, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_server_final_with_invalid_base64_signature_is_refused() -> None:
    client = rfc_client()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(BackendAuthError):
        client.verify_server_final(b"v=abc")


def test_auth_errors_never_contain_the_password() -> None:
    client = ScramClient("hunter2-secret")
    with pytest.raises(BackendAuthError) as caught:
        client.client_final(b"r=other,s=c2FsdA==,i=1")
    assert "hunter2" not in str(caught.value)


# ------------------------------------------------------------------------------------------------
# MD5
# ------------------------------------------------------------------------------------------------


def test_md5_password_is_postgresql_documented_double_md5() -> None:
    salt = b"\x93\x1a\x05\xff"
    inner = hashlib.md5(b"s3cret" + b"alice").hexdigest()  # noqa: S324 - the protocol's own hash
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()  # noqa: S324
    assert md5_password("alice", "s3cret", salt) == expected
    assert len(expected) == 35


def test_md5_password_depends_on_user_and_salt() -> None:
    base = md5_password("alice", "pw", b"salt")
    assert md5_password("bob", "pw", b"salt") != base
    assert md5_password("alice", "pw", b"SALT") != base


def test_the_salted_password_is_derived_once_per_password_salt_and_iterations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from data_plane.postgres import auth

    derived: list[tuple[bytes, int]] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        derived.append((salt, iterations))
        return real(name, password, salt, iterations)

    monkeypatch.setattr(auth.hashlib, "pbkdf2_hmac", counting)
    monkeypatch.setattr(auth, "_SALTED", {})
    for _ in range(2):  # the RFC vector twice, then a rotated password and another salt
        assert rfc_client().client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert len(derived) == 1
    exchanges = []
    for password in ("pw-1", "pw-2", "pw-2"):
        client, _, server_first = pg_exchange(password)
        exchanges.append((password, client._client_first_bare, server_first, client.client_final(server_first)))
    assert len(derived) == 3
    monkeypatch.setattr(auth, "_SALTED_MAX", 2)
    auth.salted_password(b"pw-3", b"salt", 64)  # full: the oldest entries (the RFC's, pw-1's) make room
    assert [key[0] for key in auth._SALTED] == [hashlib.sha256(b"pw-2").digest(), hashlib.sha256(b"pw-3").digest()]
    monkeypatch.setattr(auth.hashlib, "pbkdf2_hmac", real)
    for password, first_bare, server_first, final in exchanges:  # a cached derivation proves the same
        proof, _ = scram_server_side(password, first_bare, server_first.decode(), final.decode().rsplit(",p=", 1)[0])
        assert final.decode().endswith(f"p={proof}")
