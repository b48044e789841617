"""Authenticating the gateway to the backend: SCRAM-SHA-256 (RFC 5802/7677), MD5 or cleartext,
whichever the server asks for. The password stays in this module's objects; nothing logs it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCRAM_SHA_256 = "SCRAM-SHA-256"
# SaltedPassword by (password digest, salt, iterations): PBKDF2 (4,096 rounds by default, ~1.5 ms on
# the event loop) runs once per backend password rather than once per session. An entry is worth
# what the password is; like the password cache, it lives in this process only.
_SALTED: dict[tuple[bytes, bytes, int], bytes] = {}
_SALTED_MAX = 256


class BackendAuthError(Exception):
    """Backend authentication could not complete (the message never contains the password)."""


def md5_password(user: str, password: str, salt: bytes) -> str:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()  # noqa: S324 - the protocol's own hash
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()  # noqa: S324


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ScramClient:
    """Client side of SCRAM-SHA-256 without channel binding (PostgreSQL's `n,,` GS2 header)."""

    def __init__(self, password: str) -> None:
        self._password = password.encode()
        self._nonce = _b64(secrets.token_bytes(18))
        self._client_first_bare = f"n=,r={self._nonce}"
        self._server_signature: bytes | None = None

    def client_first(self) -> bytes:
        return ("n,," + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        try:
            attrs = _attributes(server_first)
            nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"], validate=True), int(attrs["i"])
        except (KeyError, ValueError) as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise BackendAuthError("malformed SCRAM server-first message") from exc
        if not nonce.startswith(self._nonce) or iterations < 1:
            raise BackendAuthError("SCRAM server nonce or iteration count invalid")
        salted = salted_password(self._password, salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first.decode()},{without_proof}".encode()
        client_signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self._server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        try:
            attrs = _attributes(server_final)
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError as exc:
            raise BackendAuthError("malformed SCRAM server-final message") from exc
        if "e" in attrs:
            raise BackendAuthError(f"SCRAM error from server: {attrs['e']}")
        if self._server_signature is None or not hmac.compare_digest(signature, self._server_signature):
            raise BackendAuthError("SCRAM server signature mismatch: not the expected server")


def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    key = (hashlib.sha256(password).digest(), salt, iterations)
    salted = _SALTED.get(key)
    if salted is None:
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        while len(_SALTED) >= _SALTED_MAX:  # rotated passwords leave entries behind: drop the oldest
            del _SALTED[next(iter(_SALTED))]
        _SALTED[key] = salted
    return salted


def _attributes(message: bytes) -> dict[str, str]:
    """SCRAM `a=value,b=value` attributes; ValueError on anything else."""
    attrs = {}
    for part in message.decode().split(","):
        if "=" not in part:
            raise ValueError("SCRAM attribute without '='")
        key, value = part.split("=", 1)
        attrs[key] = value
    return attrs
