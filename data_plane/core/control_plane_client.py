"""The gateway's calls to the control plane, signed with SigV4 as the gateway's IAM role (the
gateway-only routes are IAM-authenticated in AWS and SigV4-checked by the local adapter)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class ControlPlaneError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"control plane answered {status}: {detail}")
        self.status = status
        self.detail = detail


class ControlPlaneClient:
    def __init__(self, base_url: str, *, region: str, credentials: Credentials | None = None,
                 timeout: float = 10.0) -> None:
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError("control plane URL must be http(s)")
        self.base_url = base_url.rstrip("/")
        self.region = region
        self.timeout = timeout
        self._credentials = credentials
        self._session = botocore.session.get_session() if credentials is None else None

    def _current_credentials(self) -> Credentials:
        if self._credentials is not None:
            return self._credentials
        creds = self._session.get_credentials() if self._session else None
        if creds is None:
            raise ControlPlaneError(0, "no AWS credentials to sign control-plane calls with")
        return creds.get_frozen_credentials()  # type: ignore[return-value]

    def request(self, method: str, path: str, body: Any | None = None, *, signed: bool = True) -> Any:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if signed:
            aws_request = AWSRequest(method=method, url=url, data=data, headers=headers)
            SigV4Auth(self._current_credentials(), "execute-api", self.region).add_auth(aws_request)
            headers = dict(aws_request.headers.items())
        request = urllib.request.Request(url, data=data or None, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - http(s) checked
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
                detail = payload.get("detail") or payload.get("message") or ""
            except (ValueError, AttributeError):
                detail = raw.decode(errors="replace")[:200]
            raise ControlPlaneError(exc.code, str(detail)) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise ControlPlaneError(0, f"unreachable: {getattr(exc, 'reason', exc)}") from None
        return json.loads(raw) if raw else None

    def grant_keys(self) -> dict[str, Any]:
        return self.request("GET", "/v1/grant-keys", signed=False)

    def credential(self, grant_token: str, session_id: str, *, pending: bool = False) -> dict[str, Any]:
        path = "/v1/credentials/pending" if pending else "/v1/credentials"
        return self.request("POST", path, {"grant": grant_token, "session_id": session_id})

    def open_approval(self, grant_token: str, session_id: str, statement: str, rule: str | None,
                      reason: str) -> dict[str, Any]:
        return self.request("POST", "/v1/gateway/approvals", {
            "grant": grant_token, "session_id": session_id, "statement": statement, "rule": rule, "reason": reason})

    def approval(self, approval_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/gateway/approvals/{approval_id}")

    def revocations(self, since: float) -> dict[str, Any]:
        return self.request("GET", f"/v1/gateway/revocations?since={since:.6f}")
