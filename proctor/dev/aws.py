"""The AWS side of the local stack: moto's server in-process, and the resources the CDK app
creates in AWS, created here through boto3."""

from __future__ import annotations

import json
import logging
import os
import secrets
import urllib.request
from dataclasses import dataclass
from typing import Any

import boto3

from control_plane.approval_workflow import definition as approval_workflow_definition

REGION = "us-east-1"
ACCOUNT = "123456789012"
RECORDINGS_BUCKET = "proctor-recordings-local"
EVIDENCE_BUCKET = "proctor-evidence-local"
CONFIG_TABLE = "proctor-config"
STATE_TABLE = "proctor-state"
GRANT_KEY_ALIAS = "alias/proctor-grant-signing"
BREAKGLASS_KEY_ALIAS = "alias/proctor-breakglass"
RETENTION_DAYS = 1
NOTIFIER_QUEUE = "proctor-approval-notifier"
NOTIFIER_DLQ = "proctor-approval-notifier-dlq"
APPROVAL_STATE_MACHINE = "proctor-approval"
APPROVAL_WORKFLOW_ROLE = f"arn:aws:iam::{ACCOUNT}:role/proctor-approval-workflow"
LINK_KEY_SECRET = "proctor/approval-link-key"  # noqa: S105 - a secret's name
EMAIL_SENDER = "proctor@example.com"
# A failed notification is retried after this long, at most five times, then parked in the DLQ.
NOTIFIER_VISIBILITY_SECONDS = 5


def start_moto() -> tuple[Any, str]:
    """moto's server on 127.0.0.1 and a free port; returns (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    enable_state_machine_execution(endpoint, port)
    return server, endpoint


def enable_state_machine_execution(endpoint: str, port: int) -> None:
    """moto's Step Functions interpreter is off by default. Its service integrations (DynamoDB,
    SQS) call back into moto's server at localhost:$MOTO_PORT, so that must name this server."""
    os.environ["MOTO_PORT"] = str(port)
    request = urllib.request.Request(f"{endpoint}/moto-api/config", method="POST",  # noqa: S310 - local moto
                                     data=json.dumps({"stepfunctions": {"execute_state_machine": True}}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        response.read()


def session() -> boto3.Session:
    # moto accepts any key; these are not credentials of anything.
    return boto3.Session(aws_access_key_id="local", aws_secret_access_key="local",  # noqa: S106
                         region_name=REGION)


_shared: boto3.Session | None = None


def client(endpoint: str | None, service: str, *, using: boto3.Session | None = None) -> Any:
    """A client of moto's server (or, with no endpoint, of whatever boto3 is pointed at: in tests,
    moto in-process). Clients share one session, so service models load once per process."""
    global _shared
    if using is None:
        if _shared is None:
            _shared = session()
        using = _shared
    return using.client(service, endpoint_url=endpoint)


@dataclass(frozen=True)
class LocalResources:
    recordings_bucket: str
    evidence_bucket: str
    config_table: str
    state_table: str
    grant_key_id: str
    notifier_queue_url: str
    approval_state_machine_arn: str
    link_key_secret: str
    email_sender: str
    breakglass_key_id: str


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
    shared = session()
    s3 = client(endpoint, "s3", using=shared)
    for bucket in (RECORDINGS_BUCKET, EVIDENCE_BUCKET):
        create_bucket_with_object_lock(s3, bucket, RETENTION_DAYS)
    dynamodb = client(endpoint, "dynamodb", using=shared)
    create_table(dynamodb, CONFIG_TABLE, ttl=False)
    create_table(dynamodb, STATE_TABLE, ttl=True)
    kms = client(endpoint, "kms", using=shared)
    key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY",
                            Description="Proctor grant signing (local)")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=GRANT_KEY_ALIAS, TargetKeyId=key_id)
    create_breakglass_key(kms)
    queue_url, state_machine_arn = create_approval_workflow(endpoint, using=shared)
    client(endpoint, "secretsmanager", using=shared).create_secret(Name=LINK_KEY_SECRET,
                                                                   SecretString=secrets.token_urlsafe(48))
    client(endpoint, "ses", using=shared).verify_email_identity(EmailAddress=EMAIL_SENDER)
    return LocalResources(RECORDINGS_BUCKET, EVIDENCE_BUCKET, CONFIG_TABLE, STATE_TABLE, GRANT_KEY_ALIAS,
                          queue_url, state_machine_arn, LINK_KEY_SECRET, EMAIL_SENDER, BREAKGLASS_KEY_ALIAS)


def create_breakglass_key(kms: Any) -> str:
    """The key that seals unmasked originals (data_plane.core.sealed); returns its alias."""
    key_id = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT",
                            Description="Proctor break-glass: unmasked payloads (local)")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=BREAKGLASS_KEY_ALIAS, TargetKeyId=key_id)
    return BREAKGLASS_KEY_ALIAS


def create_approval_workflow(endpoint: str | None, *, using: boto3.Session | None = None) -> tuple[str, str]:
    """The notifier queue (with its dead-letter queue) and the state machine, from the very
    definition the CDK app deploys. Returns (queue URL, state machine ARN)."""
    sqs = client(endpoint, "sqs", using=using)
    dlq_url = sqs.create_queue(QueueName=NOTIFIER_DLQ)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=NOTIFIER_QUEUE, Attributes={
        "VisibilityTimeout": str(NOTIFIER_VISIBILITY_SECONDS),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
    })["QueueUrl"]
    definition = approval_workflow_definition(state_table=STATE_TABLE, notifier_queue_url=queue_url)
    state_machine_arn = client(endpoint, "stepfunctions", using=using).create_state_machine(
        name=APPROVAL_STATE_MACHINE, definition=json.dumps(definition), roleArn=APPROVAL_WORKFLOW_ROLE,
    )["stateMachineArn"]
    return queue_url, state_machine_arn


def put_secret(endpoint: str | None, name: str, value: dict[str, Any]) -> str:
    sm = client(endpoint, "secretsmanager")
    return str(sm.create_secret(Name=name, SecretString=json.dumps(value))["ARN"])
