"""Everything a session needs from the gateway, in one place."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from data_plane.config import GatewayConfig
from data_plane.core.credentials import CredentialBroker
from data_plane.core.grants import GrantAuthority
from data_plane.core.registry import SessionRegistry
from data_plane.core.sealed import BreakGlassKey
from data_plane.core.spool import Spool


@dataclass
class GatewayContext:
    config: GatewayConfig
    authority: GrantAuthority
    credentials: CredentialBroker
    spool: Spool
    registry: SessionRegistry
    tls: ssl.SSLContext | None
    draining: bool = False
    sealing: BreakGlassKey | None = None  # seals the unmasked originals of masked results


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    # PostgreSQL 17 clients may negotiate TLS directly with ALPN "postgresql".
    context.set_alpn_protocols(["postgresql"])
    return context
