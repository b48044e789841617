"""Grant signing through KMS: JWS ES256 assembled from KMS's DER signatures, RAW up to KMS's
4 KiB message limit and DIGEST beyond it."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from moto import mock_aws

from control_plane.contract import GrantClaims, GrantInvalid, GrantKeySet, Identity, verify_grant
from control_plane.signing import KMS_RAW_MESSAGE_LIMIT, GrantSigner
from data_plane.core.grants import GrantAuthority


def _claims(rules: int = 0, **overrides: Any) -> GrantClaims:
    now = int(time.time())
    values: dict[str, Any] = dict(
        grant_id="gtest", identity=Identity("https://idp", "alice", ("engineers",)), target="demo-pg",
        target_kind="postgres", backend_role="app_ro", database="app", policy_name="p", policy_version=3,
        issued_at=now, expires_at=now + 600,
        guardrails=tuple({"name": f"r{i}", "action": "block", "match": {"regex": "y" * 90}} for i in range(rules)),
    )
    values.update(overrides)
    return GrantClaims(**values)


class DigestHonouringKms:
    """A KMS signer that implements MessageType=DIGEST as AWS documents it (moto 5.2 hashes the
    digest again, so the DIGEST path cannot be exercised against moto)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.calls: list[str] = []

    def get_public_key(self, KeyId: str) -> dict[str, bytes]:
        return {"PublicKey": self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo)}

    def sign(self, KeyId: str, Message: bytes, MessageType: str, SigningAlgorithm: str) -> dict[str, bytes]:
        assert SigningAlgorithm == "ECDSA_SHA_256"
        self.calls.append(MessageType)
        if MessageType == "RAW":
            assert len(Message) <= KMS_RAW_MESSAGE_LIMIT
            return {"Signature": self.key.sign(Message, ec.ECDSA(hashes.SHA256()))}
        assert len(Message) == 32
        return {"Signature": self.key.sign(Message, ec.ECDSA(Prehashed(hashes.SHA256())))}


def test_grant_signed_by_moto_kms_verifies_with_published_jwks() -> None:
    with mock_aws():
        kms = boto3.client("kms", region_name="us-east-1")
        key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
        signer = GrantSigner(kms, key_id)
        token = signer.sign(_claims().to_jwt_claims())
        claims = verify_grant(token, GrantKeySet(signer.jwks()))
    assert claims.grant_id == "gtest" and claims.identity.groups == ("engineers",)


def test_large_grant_is_signed_over_its_digest() -> None:
    kms = DigestHonouringKms()
    signer = GrantSigner(kms, "key")
    small = signer.sign(_claims(rules=1).to_jwt_claims())
    large = signer.sign(_claims(rules=60).to_jwt_claims())
    assert kms.calls == ["RAW", "DIGEST"]
    assert len(large) > KMS_RAW_MESSAGE_LIMIT
    keys = GrantKeySet(signer.jwks())
    assert verify_grant(small, keys).grant_id == "gtest"
    assert len(verify_grant(large, keys).guardrails) == 60


def test_grant_from_another_key_or_expired_is_refused() -> None:
    signer = GrantSigner(DigestHonouringKms(), "key")
    other = GrantSigner(DigestHonouringKms(), "key")
    keys = GrantKeySet(signer.jwks())
    with pytest.raises(GrantInvalid, match="unknown key"):
        verify_grant(other.sign(_claims().to_jwt_claims()), keys)
    now = int(time.time())
    with pytest.raises(GrantInvalid, match="expired"):
        verify_grant(signer.sign(_claims(issued_at=now - 900, expires_at=now - 300).to_jwt_claims()), keys)
    with pytest.raises(GrantInvalid, match="not a valid JWT"):
        verify_grant("garbage", keys)


async def test_sessions_presenting_the_same_grant_share_one_verified_copy_and_each_is_still_checked() -> None:
    signer = GrantSigner(DigestHonouringKms(), "key")
    authority = GrantAuthority(SimpleNamespace())  # type: ignore[arg-type]
    authority.keys = GrantKeySet(signer.jwks())
    token = signer.sign(_claims(rules=3).to_jwt_claims())
    first = await authority.verify(token)
    again = await authority.verify("".join(token))  # an equal token read from another connection
    assert again is first and first.claims.grant_id == "gtest" and first.token == token
    other = await authority.verify(signer.sign(_claims(grant_id="gother").to_jwt_claims()))
    assert other is not first and other.claims.grant_id == "gother"
    authority.revoked.add("gtest")  # sharing never skips a check: the next session is refused
    with pytest.raises(GrantInvalid, match="revoked"):
        await authority.verify(token)
