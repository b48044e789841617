"""Grant signing with the control plane's KMS asymmetric key (ECC_NIST_P256 → JWS ES256)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from control_plane.contract import GRANT_ALGORITHM

KMS_RAW_MESSAGE_LIMIT = 4096


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(32, "big")


class GrantSigner:
    """Signs grant claims through `kms.sign`; the private key never leaves KMS."""

    def __init__(self, kms: Any, key_id: str) -> None:
        self._kms = kms
        self._key_id = key_id
        self._jwk: dict[str, str] | None = None
        self._lock = threading.Lock()

    def public_jwk(self) -> dict[str, str]:
        with self._lock:
            if self._jwk is None:
                der = self._kms.get_public_key(KeyId=self._key_id)["PublicKey"]
                key = load_der_public_key(der)
                if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
                    raise ValueError("grant signing key must be ECC_NIST_P256")
                numbers = key.public_numbers()
                x, y = b64url(_int_bytes(numbers.x)), b64url(_int_bytes(numbers.y))
                # RFC 7638 thumbprint: the kid changes exactly when the key does.
                thumbprint = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y},
                                        separators=(",", ":"), sort_keys=True)
                kid = b64url(hashlib.sha256(thumbprint.encode()).digest())
                self._jwk = {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid,
                             "alg": GRANT_ALGORITHM, "use": "sig"}
            return dict(self._jwk)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [self.public_jwk()]}

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": GRANT_ALGORITHM, "typ": "JWT", "kid": self.public_jwk()["kid"]}
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        ).encode()
        if len(signing_input) <= KMS_RAW_MESSAGE_LIMIT:
            message, message_type = signing_input, "RAW"
        else:
            # KMS takes at most 4 KiB raw; ES256 over the SHA-256 digest is the same signature.
            message, message_type = hashlib.sha256(signing_input).digest(), "DIGEST"
        der = self._kms.sign(KeyId=self._key_id, Message=message, MessageType=message_type,
                             SigningAlgorithm="ECDSA_SHA_256")["Signature"]
        r, s = decode_dss_signature(der)
        return signing_input.decode() + "." + b64url(_int_bytes(r) + _int_bytes(s))
