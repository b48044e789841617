"""The AWS side of the local stack: moto's server in-process, and the resources the CDK app
creates in AWS, created here through boto3."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import boto3

REGION = "us-east-1"
ACCOUNT = "123456789012"
RECORDINGS_BUCKET = "proctor-recordings-local"
EVIDENCE_BUCKET = "proctor-evidence-local"
CONFIG_TABLE = "proctor-config"
STATE_TABLE = "proctor-state"
GRANT_KEY_ALIAS = "alias/proctor-grant-signing"
RETENTION_DAYS = 1


def start_moto() -> tuple[Any, str]:
    """moto's server on 127.0.0.1 and a free port; returns (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def client(endpoint: str | None, service: str) -> Any:
    """A client of moto's server (or, with no endpoint, of whatever boto3 is pointed at: in tests,
    moto in-process)."""
    # moto accepts any key; these are not credentials of anything.
    session = boto3.Session(aws_access_key_id="local", aws_secret_access_key="local",  # noqa: S106
                            region_name=REGION)
    return session.client(service, endpoint_url=endpoint)


@dataclass(frozen=True)
class LocalResources:
    recordings_bucket: str
    evidence_bucket: str
    config_table: str
    state_table: str
    grant_key_id: str


def create_bucket_with_object_lock(s3: Any, name: str, retention_days: int) -> None:
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object_lock_configuration(
        Bucket=name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": retention_days}},
        },
    )
    s3.put_public_access_block(
        Bucket=name,
        PublicAccessBlockConfiguration={"BlockPublicAcls": True, "IgnorePublicAcls": True,
                                        "BlockPublicPolicy": True, "RestrictPublicBuckets": True},
    )


def create_table(dynamodb: Any, name: str, *, ttl: bool) -> None:
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                              {"AttributeName": "sk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    if ttl:
        dynamodb.update_time_to_live(TableName=name,
                                     TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"})


def create_resources(endpoint: str | None) -> LocalResources:
    s3 = client(endpoint, "s3")
    for bucket in (RECORDINGS_BUCKET, EVIDENCE_BUCKET):
        create_bucket_with_object_lock(s3, bucket, RETENTION_DAYS)
    dynamodb = client(endpoint, "dynamodb")
    create_table(dynamodb, CONFIG_TABLE, ttl=False)
    create_table(dynamodb, STATE_TABLE, ttl=True)
    kms = client(endpoint, "kms")
    key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY",
                            Description="Proctor grant signing (local)")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=GRANT_KEY_ALIAS, TargetKeyId=key_id)
    return LocalResources(RECORDINGS_BUCKET, EVIDENCE_BUCKET, CONFIG_TABLE, STATE_TABLE, GRANT_KEY_ALIAS)


def put_secret(endpoint: str | None, name: str, value: dict[str, Any]) -> str:
    sm = client(endpoint, "secretsmanager")
    return str(sm.create_secret(Name=name, SecretString=json.dumps(value))["ARN"])
