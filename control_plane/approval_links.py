"""Email links to an approval's confirmation page, and the CSRF tokens of its form.

A link names the approval, the approver it was issued to and its expiry, and carries an
HMAC-SHA256 over the three (key from Secrets Manager): never the workflow's task token. The page's
form carries a CSRF token bound to (approval, approver, nonce); the nonce is stored when the page
is served and deleted when the form is posted, so a form posts at most once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from control_plane.errors import Forbidden


class LinkRefused(Forbidden):
    """An approval link or form that cannot be honoured; the message is safe to show."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mac(key: bytes, *parts: str) -> str:
    return _b64(hmac.new(key, "|".join(parts).encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class ReviewLink:
    approval_id: str
    approver: str
    expires_at: int
    signature: str

    @classmethod
    def issue(cls, key: bytes, approval_id: str, approver: str, expires_at: int) -> ReviewLink:
        approver = approver.lower()
        return cls(approval_id, approver, int(expires_at), _mac(key, "link", approval_id, approver, str(expires_at)))

    def url(self, base_url: str) -> str:
        query = urlencode({"approver": self.approver, "exp": self.expires_at, "sig": self.signature})
        return f"{base_url.rstrip('/')}/v1/approvals/{quote(self.approval_id)}/review?{query}"

    @classmethod
    def verify(cls, key: bytes, approval_id: str, approver: str | None, expires_at: str | None,
               signature: str | None, *, now: float) -> ReviewLink:
        if not approver or not expires_at or not signature or not expires_at.isdigit():
            raise LinkRefused("this approval link is incomplete")
        expected = cls.issue(key, approval_id, approver, int(expires_at))
        if not hmac.compare_digest(expected.signature, signature):
            raise LinkRefused("this approval link is not valid")
        if now >= expected.expires_at:
            raise LinkRefused("this approval link has expired")
        return expected


def new_form_token(key: bytes, approval_id: str, approver: str) -> tuple[str, str]:
    """(token for the form, nonce to store)."""
    nonce = secrets.token_urlsafe(18)
    return f"{nonce}.{_mac(key, 'csrf', approval_id, approver.lower(), nonce)}", nonce


def form_token_nonce(key: bytes, token: str | None, approval_id: str, approver: str) -> str:
    """The nonce of a well-formed token bound to this approval and approver (else LinkRefused);
    the caller still has to consume the nonce."""
    nonce, _, mac = (token or "").partition(".")
    if not nonce or not mac or not hmac.compare_digest(mac, _mac(key, "csrf", approval_id, approver.lower(), nonce)):
        raise LinkRefused("the form's security token is missing or not valid: open the link from the email again")
    return nonce
