"""Deployment settings, read once from CDK context.

Every value has a default so `cdk synth` runs offline, with no AWS credentials and no lookups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aws_cdk import aws_logs as logs
from constructs import Node

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAMBDA_LAYER_DIR = REPO_ROOT / "build" / "lambda-layer"
LAMBDA_LAYER_DIR_CONTEXT = "proctor:lambdaLayerDir"

# The retention periods CloudWatch Logs accepts, in the order of `logs.RetentionDays`.
_RETENTION_DAYS = (
    1,
    3,
    5,
    7,
    14,
    30,
    60,
    90,
    120,
    150,
    180,
    365,
    400,
    545,
    731,
    1096,
    1827,
    2192,
    2557,
    2922,
    3288,
    3653,
)
LOG_RETENTION = dict(zip(_RETENTION_DAYS, list(logs.RetentionDays)[: len(_RETENTION_DAYS)], strict=True))


@dataclass(frozen=True)
class ProctorSettings:
    """What an operator may choose per deployment (`cdk.json` context or `cdk synth -c key=value`)."""

    account: str
    region: str
    gateway_regions: tuple[str, ...]
    evidence_retention_days: int
    log_retention: logs.RetentionDays
    admin_groups: tuple[str, ...]
    approver_groups: tuple[str, ...]
    extra_gateway_principals: tuple[str, ...]
    lambda_layer_dir: Path
    api_stage_name: str
    api_throttle_rate: int
    api_throttle_burst: int
    tls_secret_name: str
    masking_key_secret_name: str
    vpc_id: str | None
    vpc_cidr: str
    client_cidrs: tuple[str, ...]
    gateway_desired_count: int
    gateway_internet_facing: bool
    approval_email_sender: str
    public_base_url: str | None

    @classmethod
    def from_context(cls, node: Node) -> ProctorSettings:
        region = _text(node, "proctor:region", "us-east-1")
        layer_dir = Path(_text(node, LAMBDA_LAYER_DIR_CONTEXT, str(DEFAULT_LAMBDA_LAYER_DIR)))
        return cls(
            account=_text(node, "proctor:account", "123456789012"),
            region=region,
            gateway_regions=_texts(node, "proctor:gatewayRegions", (region,)),
            evidence_retention_days=_number(node, "proctor:evidenceRetentionDays", 365),
            log_retention=_log_retention(_number(node, "proctor:logRetentionDays", 365)),
            admin_groups=_texts(node, "proctor:adminGroups", ("admins",)),
            approver_groups=_texts(node, "proctor:approverGroups", ("approvers",)),
            extra_gateway_principals=_texts(node, "proctor:gatewayPrincipals", ()),
            lambda_layer_dir=layer_dir if layer_dir.is_absolute() else REPO_ROOT / layer_dir,
            api_stage_name=_text(node, "proctor:apiStageName", "prod"),
            api_throttle_rate=_number(node, "proctor:apiThrottleRate", 50),
            api_throttle_burst=_number(node, "proctor:apiThrottleBurst", 100),
            tls_secret_name=_text(node, "proctor:tlsSecretName", "proctor/gateway-tls"),
            masking_key_secret_name=_text(node, "proctor:maskingKeySecretName", "proctor/masking-hash-key"),
            vpc_id=_text(node, "proctor:vpcId", "") or None,
            vpc_cidr=_text(node, "proctor:vpcCidr", "10.64.0.0/16"),
            client_cidrs=_texts(node, "proctor:clientCidrs", ()),
            gateway_desired_count=_number(node, "proctor:gatewayDesiredCount", 2),
            gateway_internet_facing=_flag(node, "proctor:gatewayInternetFacing", False),
            approval_email_sender=_text(node, "proctor:approvalEmailSender", "proctor@example.com"),
            public_base_url=_text(node, "proctor:publicBaseUrl", "") or None,
        )


def _raw(node: Node, key: str) -> Any:
    return node.try_get_context(key)


def _text(node: Node, key: str, default: str) -> str:
    value = _raw(node, key)
    return default if value is None else str(value).strip()


def _texts(node: Node, key: str, default: Sequence[str]) -> tuple[str, ...]:
    # `-c key=a,b` arrives as a string, cdk.json may hold a JSON list.
    value = _raw(node, key)
    if value is None:
        return tuple(default)
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


def _number(node: Node, key: str, default: int) -> int:
    value = _raw(node, key)
    return default if value is None else int(value)


def _flag(node: Node, key: str, default: bool) -> bool:
    value = _raw(node, key)
    if value is None:
        return default
    return value is True or str(value).lower() in ("true", "1", "yes")


def _log_retention(days: int) -> logs.RetentionDays:
    if days not in LOG_RETENTION:
        raise ValueError(f"proctor:logRetentionDays must be one of {sorted(LOG_RETENTION)}, not {days}")
    return LOG_RETENTION[days]
