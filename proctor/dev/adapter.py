"""The local stand-in for API Gateway: HTTP requests become the same REST proxy events API
Gateway builds, and go to the same Lambda handlers. Gateway-only routes are IAM-authenticated in
AWS; here the adapter checks the caller's SigV4 signature against the local gateway key, as API
Gateway would, and fills in the caller's role the same way."""

from __future__ import annotations

import base64
import hmac
import json
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
MAX_BODY = 1 << 20
SIGNATURE_MAX_SKEW = 300


@dataclass(frozen=True)
class IamKey:
    """An access key the adapter accepts, and the role session API Gateway would report for it."""

    access_key: str
    secret_key: str
    role_arn: str

    @property
    def session_arn(self) -> str:
        account = self.role_arn.split(":")[4]
        role = self.role_arn.rsplit("/", 1)[-1]
        return f"arn:aws:sts::{account}:assumed-role/{role}/local"


@dataclass(frozen=True)
class Route:
    prefix: str
    handler: Handler
    function_name: str
    iam: bool


class LambdaContext:
    """The attributes Powertools reads from a Lambda context."""

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = 512
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def verify_sigv4(method: str, url: str, headers: Mapping[str, str], body: bytes, keys: Mapping[str, IamKey],
                 *, now: float | None = None) -> IamKey | None:
    """The key that signed this request, or None. Recomputes the signature with botocore."""
    auth = headers.get("Authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return None
    fields = dict(part.strip().split("=", 1) for part in auth[len("AWS4-HMAC-SHA256 "):].split(","))
    try:
        access_key, date, region, service, _ = fields["Credential"].split("/")
        signed_headers = fields["SignedHeaders"].split(";")
        signature = fields["Signature"]
        amz_date = headers["X-Amz-Date"]
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except (KeyError, ValueError):
        return None
    key = keys.get(access_key)
    if key is None or abs((now or time.time()) - signed_at) > SIGNATURE_MAX_SKEW or not amz_date.startswith(date):
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    request = AWSRequest(method=method, url=url, data=body,
                         headers={h: lowered[h] for h in signed_headers if h in lowered})
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(key.access_key, key.secret_key), service, region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    return key if hmac.compare_digest(expected, signature) else None


class ApiAdapter:
    def __init__(self, routes: list[Route], iam_keys: Mapping[str, IamKey], *, stage: str = "local") -> None:
        self.routes = routes
        self.iam_keys = dict(iam_keys)
        self.stage = stage
        # Powertools keeps the current event on a class shared by every resolver in the process, so
        # the local stand-in runs one invocation at a time (in AWS each function is its own process).
        self._lock = threading.Lock()

    def route_for(self, path: str) -> Route | None:
        matches = [r for r in self.routes if path == r.prefix or path.startswith(r.prefix.rstrip("/") + "/")]
        return max(matches, key=lambda r: len(r.prefix)) if matches else None

    def build_event(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes, source_ip: str,
                    user_arn: str | None) -> dict[str, Any]:
        split = urlsplit(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        multi_headers: dict[str, list[str]] = {}
        for k, v in headers.items():
            multi_headers.setdefault(k, []).append(v)
        return {
            "resource": "/v1/{proxy+}",
            "path": split.path,
            "httpMethod": method,
            "headers": dict(headers),
            "multiValueHeaders": multi_headers,
            "queryStringParameters": {k: v[-1] for k, v in query.items()} or None,
            "multiValueQueryStringParameters": query or None,
            "pathParameters": {"proxy": split.path.removeprefix("/v1/")},
            "stageVariables": None,
            "requestContext": {
                "resourcePath": "/v1/{proxy+}",
                "httpMethod": method,
                "path": f"/{self.stage}{split.path}",
                "stage": self.stage,
                "requestId": str(uuid.uuid4()),
                "requestTimeEpoch": int(time.time() * 1000),
                "accountId": "123456789012",
                "apiId": "local",
                "protocol": "HTTP/1.1",
                "identity": {"sourceIp": source_ip, "userArn": user_arn, "caller": user_arn,
                             "userAgent": headers.get("User-Agent")},
            },
            "body": body.decode() if body else None,
            "isBase64Encoded": False,
        }

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes, source_ip: str,
               host: str) -> tuple[int, dict[str, str], bytes]:
        route = self.route_for(urlsplit(raw_path).path)
        if route is None:
            return 404, {"Content-Type": "application/json"}, b'{"message":"Not Found"}'
        user_arn = None
        if route.iam:
            key = verify_sigv4(method, f"http://{host}{raw_path}", headers, body, self.iam_keys)
            if key is None:
                # What API Gateway answers an unsigned or badly signed call to an IAM route.
                return 403, {"Content-Type": "application/json"}, b'{"message":"Missing Authentication Token"}'
            user_arn = key.session_arn
        event = self.build_event(method, raw_path, headers, body, source_ip, user_arn)
        with self._lock:
            result = route.handler(event, LambdaContext(route.function_name))
        out_headers = dict(result.get("headers") or {})
        for k, values in (result.get("multiValueHeaders") or {}).items():
            out_headers[k] = ", ".join(values)
        payload = result.get("body") or ""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if result.get("isBase64Encoded"):
            data = base64.b64decode(data)
        return int(result.get("statusCode", 500)), out_headers, data


def serve(adapter: ApiAdapter, server: ThreadingHTTPServer) -> threading.Thread:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._reply(413, {"Content-Type": "application/json"}, b'{"message":"Request too large"}')
                return
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items()}
            try:
                status, out_headers, data = adapter.handle(self.command, self.path, headers, body,
                                                           self.client_address[0], self.headers.get("Host", ""))
            except Exception as exc:  # a handler crash is a 502 from API Gateway, not a dead adapter
                traceback.print_exc()
                data = json.dumps({"message": "Internal server error", "error": type(exc).__name__}).encode()
                status, out_headers = 502, {"Content-Type": "application/json"}
            self._reply(status, out_headers, data)

        def _reply(self, status: int, headers: Mapping[str, str], data: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() not in ("content-length", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, name="api-adapter", daemon=True)
    thread.start()
    return thread
