"""OIDC token validation: one verifier per configured issuer, pinned algorithms, cached JWKS."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from control_plane.contract import Identity
from control_plane.errors import AuthenticationFailed

# Symmetric algorithms are never accepted: an issuer's public JWKS must not become an HMAC secret.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_PIPELINE_CLAIMS = {
    "repository": "repository",
    "workflow": "workflow",
    "run_id": "run_id",
    "run_attempt": "run_attempt",
    "actor": "actor",
    "ref": "ref",
    "sha": "sha",
    "job": "job",
}


@dataclass(frozen=True)
class IssuerConfig:
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str
    algorithms: tuple[str, ...] = ("RS256",)
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    email_claim: str = "email"
    pipeline_claims: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_PIPELINE_CLAIMS))

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> IssuerConfig:
        algorithms = tuple(doc.get("algorithms") or ("RS256",))
        bad = set(algorithms) - ASYMMETRIC_ALGORITHMS
        if bad:
            raise ValueError(f"issuer {doc['issuer']}: algorithms not allowed: {sorted(bad)}")
        return cls(
            issuer=doc["issuer"],
            audiences=tuple(doc["audiences"]),
            jwks_uri=doc["jwks_uri"],
            algorithms=algorithms,
            subject_claim=doc.get("subject_claim", "sub"),
            groups_claim=doc.get("groups_claim", "groups"),
            email_claim=doc.get("email_claim", "email"),
            pipeline_claims=dict(doc.get("pipeline_claims") or DEFAULT_PIPELINE_CLAIMS),
        )


class TokenRejected(AuthenticationFailed):
    """An OIDC token was refused; `reason` is recorded in the evidence."""

    def __init__(self, reason: str, *, issuer: str | None = None, subject: str | None = None) -> None:
        super().__init__(f"invalid token: {reason}")
        self.reason = reason
        self.issuer = issuer
        self.subject = subject


class OidcVerifier:
    """Validates bearer tokens against the configured issuers; JWKS clients are cached per issuer."""

    def __init__(self, issuers: Callable[[str], Mapping[str, Any] | None], *, leeway: int = 30) -> None:
        self._issuer_lookup = issuers
        self._leeway = leeway
        self._jwks: dict[str, jwt.PyJWKClient] = {}
        self._lock = threading.Lock()

    def _jwks_client(self, uri: str) -> jwt.PyJWKClient:
        with self._lock:
            client = self._jwks.get(uri)
            if client is None:
                client = jwt.PyJWKClient(uri, cache_keys=True, lifespan=300, timeout=5)
                self._jwks[uri] = client
            return client

    def verify(self, token: str) -> Identity:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRejected("malformed token") from exc
        issuer = unverified.get("iss")
        subject = unverified.get("sub")
        doc = self._issuer_lookup(issuer) if isinstance(issuer, str) else None
        if doc is None:
            raise TokenRejected("unknown issuer", issuer=issuer, subject=subject)
        config = IssuerConfig.from_doc(doc)
        alg = header.get("alg")
        if alg not in config.algorithms:
            raise TokenRejected(f"algorithm {alg!r} not allowed for issuer", issuer=issuer, subject=subject)
        if not header.get("kid"):
            raise TokenRejected("token has no key id", issuer=issuer, subject=subject)
        try:
            signing_key = self._jwks_client(config.jwks_uri).get_signing_key(header["kid"])
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenRejected("issuer keys unavailable", issuer=issuer, subject=subject) from exc
        except jwt.PyJWKClientError as exc:
            raise TokenRejected("unknown signing key", issuer=issuer, subject=subject) from exc
        try:
            claims = jwt.decode(
                token,
                signing_key.key,
                algorithms=list(config.algorithms),
                audience=list(config.audiences),
                issuer=config.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenRejected("token expired", issuer=issuer, subject=subject) from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenRejected("token not yet valid", issuer=issuer, subject=subject) from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenRejected("wrong audience", issuer=issuer, subject=subject) from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenRejected("wrong issuer", issuer=issuer, subject=subject) from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenRejected("signature invalid", issuer=issuer, subject=subject) from exc
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"token rejected ({type(exc).__name__})", issuer=issuer, subject=subject) from exc
        return identity_from_claims(config, claims)


def identity_from_claims(config: IssuerConfig, claims: Mapping[str, Any]) -> Identity:
    groups = claims.get(config.groups_claim) or ()
    if isinstance(groups, str):
        groups = tuple(g for g in groups.replace(",", " ").split() if g)
    pipeline = {
        field_name: str(claims[claim])
        for field_name, claim in config.pipeline_claims.items()
        if claims.get(claim) not in (None, "")
    }
    # A token carrying no repository is a person's, whatever else it holds.
    if "repository" not in pipeline:
        pipeline = {}
    return Identity(
        issuer=config.issuer,
        subject=str(claims[config.subject_claim]),
        groups=tuple(str(g) for g in groups),
        pipeline=pipeline,
        email=claims.get(config.email_claim),
    )
