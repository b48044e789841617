"""The CDK app, synthesized once: the security properties that matter, and a cdk-nag clean bill.

Synth runs through the library (no CDK CLI), offline, with the Lambda layer pointed at an empty
directory; container and Lambda assets are only fingerprinted, never built.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from aws_cdk import App, Validations
from aws_cdk.assertions import Match, Template
from cdk_nag import AwsSolutionsChecks

from control_plane.contract import EVENT_COLUMNS, PARTITION_COLUMNS, SESSION_COLUMNS
from infra.app import ProctorStacks, build
from infra.constructs.evidence_queries import NAMED_QUERIES
from infra.settings import REPO_ROOT, ProctorSettings

HOME_REGION = "us-east-1"


@dataclass
class Synthesized:
    app: App
    stacks: ProctorStacks
    outdir: Path
    error: Exception | None

    def validation_report(self) -> dict[str, Any]:
        path = self.outdir / "validation-report.json"
        return json.loads(path.read_text()) if path.exists() else {"pluginReports": []}


def _context(layer_dir: Path, **overrides: Any) -> dict[str, Any]:
    context = json.loads((REPO_ROOT / "cdk.json").read_text())["context"]
    return {**context, "proctor:lambdaLayerDir": str(layer_dir), "aws:cdk:bundling-stacks": [], **overrides}


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    layer_dir = tmp_path_factory.mktemp("lambda-layer")
    (layer_dir / "python").mkdir()
    outdir = tmp_path_factory.mktemp("cdk.out")
    app = App(context=_context(layer_dir), outdir=str(outdir))
    stacks = build(app)
    try:
        app.synth()
    except Exception as error:  # cdk-nag findings fail synth; test_cdk_nag_... reports them
        return Synthesized(app, stacks, outdir, error)
    return Synthesized(app, stacks, outdir, None)


@pytest.fixture(scope="module")
def evidence(synthesized: Synthesized) -> Template:
    return Template.from_stack(synthesized.stacks.evidence)


@pytest.fixture(scope="module")
def control_plane(synthesized: Synthesized) -> Template:
    return Template.from_stack(synthesized.stacks.control_plane)


@pytest.fixture(scope="module")
def gateway(synthesized: Synthesized) -> Template:
    return Template.from_stack(synthesized.stacks.gateways[HOME_REGION])


def _of_type(template: Template, resource_type: str) -> dict[str, dict[str, Any]]:
    return template.find_resources(resource_type)


def _worm_buckets(template: Template) -> dict[str, dict[str, Any]]:
    return {
        logical_id: bucket
        for logical_id, bucket in _of_type(template, "AWS::S3::Bucket").items()
        if bucket["Properties"].get("ObjectLockEnabled")
    }


def _statements(template: Template, role_logical_id: str) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = []
    for policy in _of_type(template, "AWS::IAM::Policy").values():
        if {"Ref": role_logical_id} in policy["Properties"]["Roles"]:
            statements.extend(policy["Properties"]["PolicyDocument"]["Statement"])
    return statements


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _actions(statements: list[dict[str, Any]]) -> set[str]:
    return {action for statement in statements for action in _as_list(statement["Action"])}


def _role_of_function(template: Template, handler: str) -> str:
    (function,) = [
        f for f in _of_type(template, "AWS::Lambda::Function").values() if f["Properties"].get("Handler") == handler
    ]
    return function["Properties"]["Role"]["Fn::GetAtt"][0]


def _flat(value: Any) -> str:
    """An ARN expression as one string, intrinsic functions kept as JSON (enough to check suffixes)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        delimiter, parts = value["Fn::Join"]
        return delimiter.join(_flat(part) for part in parts)
    return json.dumps(value, sort_keys=True)


def _output_and_tail(arn: Any) -> tuple[str, str]:
    """(stack output the ARN starts from, literal text after it) of an imported-resource ARN expression."""
    parts = arn["Fn::Join"][1]
    (output,) = [p["Fn::GetStackOutput"]["OutputName"] for p in parts if isinstance(p, dict)]
    return output, parts[-1]


# -- evidence ------------------------------------------------------------------------------------


def test_recordings_and_evidence_buckets_lock_objects_in_compliance_mode_for_a_year(evidence: Template) -> None:
    buckets = _worm_buckets(evidence)
    assert len(buckets) == 2
    for bucket in buckets.values():
        assert bucket["Properties"]["ObjectLockConfiguration"] == {
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 365}},
        }
        assert bucket["DeletionPolicy"] == "Retain"


def test_evidence_buckets_encrypt_with_the_rotating_customer_managed_key(evidence: Template) -> None:
    (key_id,) = [k for k in _of_type(evidence, "AWS::KMS::Key") if k != _breakglass_key(evidence)]
    assert _of_type(evidence, "AWS::KMS::Key")[key_id]["Properties"]["EnableKeyRotation"] is True
    for bucket in _worm_buckets(evidence).values():
        (rule,) = bucket["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
        assert rule["ServerSideEncryptionByDefault"]["KMSMasterKeyID"] == {"Fn::GetAtt": [key_id, "Arn"]}
        assert rule["BucketKeyEnabled"] is True


def test_every_bucket_is_versioned_private_and_tls_only(evidence: Template) -> None:
    buckets = _of_type(evidence, "AWS::S3::Bucket")
    assert len(buckets) == 4  # recordings, evidence, access logs, Athena results
    policies = {
        policy["Properties"]["Bucket"]["Ref"]: policy["Properties"]["PolicyDocument"]["Statement"]
        for policy in _of_type(evidence, "AWS::S3::BucketPolicy").values()
    }
    for logical_id, bucket in buckets.items():
        properties = bucket["Properties"]
        assert properties["VersioningConfiguration"] == {"Status": "Enabled"}
        assert properties["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        deny_plaintext = [
            s
            for s in policies[logical_id]
            if s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
        ]
        assert deny_plaintext, f"{logical_id} accepts plain HTTP"
        assert deny_plaintext[0]["Action"] == "s3:*"


def test_evidence_buckets_log_access_to_a_separate_sse_s3_bucket(evidence: Template) -> None:
    worm = _worm_buckets(evidence)
    targets = {b["Properties"]["LoggingConfiguration"]["DestinationBucketName"]["Ref"] for b in worm.values()}
    (log_bucket_id,) = targets
    assert log_bucket_id not in worm
    log_bucket = _of_type(evidence, "AWS::S3::Bucket")[log_bucket_id]["Properties"]
    (rule,) = log_bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}


@pytest.mark.parametrize(
    ("table", "columns", "prefix"), [("events", EVENT_COLUMNS, "events"), ("sessions", SESSION_COLUMNS, "sessions")]
)
def test_glue_tables_follow_the_contract_and_project_partitions(
    evidence: Template, table: str, columns: tuple[tuple[str, str], ...], prefix: str
) -> None:
    (glue_table,) = [
        t["Properties"]["TableInput"]
        for t in _of_type(evidence, "AWS::Glue::Table").values()
        if t["Properties"]["TableInput"]["Name"] == table
    ]
    storage = glue_table["StorageDescriptor"]
    assert [(c["Name"], c["Type"]) for c in storage["Columns"]] == list(columns)
    assert [(c["Name"], c["Type"]) for c in glue_table["PartitionKeys"]] == list(PARTITION_COLUMNS)
    assert glue_table["TableType"] == "EXTERNAL_TABLE"
    assert storage["SerdeInfo"]["SerializationLibrary"] == "org.openx.data.jsonserde.JsonSerDe"
    assert storage["InputFormat"] == "org.apache.hadoop.mapred.TextInputFormat"
    parameters = glue_table["Parameters"]
    assert {k: v for k, v in parameters.items() if k.startswith("projection.")} == {
        "projection.enabled": "true",
        "projection.dt.type": "date",
        "projection.dt.format": "yyyy-MM-dd",
        "projection.dt.range": "2024-01-01,NOW",
        "projection.dt.interval": "1",
        "projection.dt.interval.unit": "DAYS",
        "projection.region.type": "enum",
        "projection.region.values": HOME_REGION,
    }
    assert _flat(parameters["storage.location.template"]).endswith(f"/{prefix}/dt=${{dt}}/region=${{region}}/")
    assert _flat(storage["Location"]).startswith("s3://")


def test_athena_workgroup_enforces_encrypted_results(evidence: Template) -> None:
    evidence.has_resource_properties(
        "AWS::Athena::WorkGroup",
        {
            "WorkGroupConfiguration": Match.object_like(
                {
                    "EnforceWorkGroupConfiguration": True,
                    "ResultConfiguration": {
                        "OutputLocation": Match.any_value(),
                        "EncryptionConfiguration": {"EncryptionOption": "SSE_KMS", "KmsKey": Match.any_value()},
                    },
                }
            )
        },
    )


def test_named_queries_are_valid_athena_sql_over_contract_columns(evidence: Template) -> None:
    deployed = {
        q["Properties"]["Name"]: q["Properties"] for q in _of_type(evidence, "AWS::Athena::NamedQuery").values()
    }
    assert {"statements-by-identity", "statements-by-pipeline-run", "sessions-per-target", "failed-logins"} <= set(
        deployed
    )
    known = {name for name, _ in (*EVENT_COLUMNS, *SESSION_COLUMNS, *PARTITION_COLUMNS)}
    for name, query in NAMED_QUERIES.items():
        assert deployed[name]["QueryString"] == query.sql
        assert deployed[name]["Database"] == "proctor_evidence"
        tree = sqlglot.parse_one(query.sql, read="athena")
        aliases = {alias.alias for alias in tree.find_all(sqlglot.exp.Alias)}
        unknown = {column.name for column in tree.find_all(sqlglot.exp.Column)} - known - aliases
        assert not unknown, f"{name} uses columns outside the contract: {unknown}"


# -- break glass ---------------------------------------------------------------------------------

BREAKGLASS_ROLE_ARN = "arn:aws:iam::123456789012:role/proctor-breakglass"
PURPOSE_CONDITION = {"StringEquals": {"kms:EncryptionContext:proctor:purpose": "unmasked-payload"}}


def _breakglass_key(template: Template) -> str:
    aliases = _of_type(template, "AWS::KMS::Alias").values()
    (alias,) = [a for a in aliases if a["Properties"]["AliasName"] == "alias/proctor-breakglass"]
    return alias["Properties"]["TargetKeyId"]["Fn::GetAtt"][0]


def test_the_break_glass_key_rotates_is_kept_and_denies_decrypt_to_all_but_its_role(evidence: Template) -> None:
    key = _of_type(evidence, "AWS::KMS::Key")[_breakglass_key(evidence)]
    assert key["Properties"]["EnableKeyRotation"] is True
    assert key["Properties"].get("KeySpec", "SYMMETRIC_DEFAULT") == "SYMMETRIC_DEFAULT"
    assert key["DeletionPolicy"] == key["UpdateReplacePolicy"] == "Retain"
    (deny,) = [s for s in key["Properties"]["KeyPolicy"]["Statement"] if s["Effect"] == "Deny"]
    assert deny["Principal"] == {"AWS": "*"}
    assert set(_as_list(deny["Action"])) == {"kms:Decrypt", "kms:ReEncryptFrom"}
    assert deny["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": BREAKGLASS_ROLE_ARN}}


def test_the_break_glass_role_needs_mfa_and_only_reads_recordings_and_opens_sealed_keys(evidence: Template) -> None:
    (role_id,) = [
        logical_id
        for logical_id, role in _of_type(evidence, "AWS::IAM::Role").items()
        if role["Properties"].get("RoleName") == "proctor-breakglass"
    ]
    role = _of_type(evidence, "AWS::IAM::Role")[role_id]["Properties"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"AWS": "arn:aws:iam::123456789012:root"}
    assert trust["Condition"] == {"Bool": {"aws:MultiFactorAuthPresent": "true"}}
    assert role["MaxSessionDuration"] == 3600

    statements = _statements(evidence, role_id)
    assert _actions(statements) == {"kms:Decrypt", "s3:GetObject", "s3:ListBucket"}
    assert all(s["Effect"] == "Allow" for s in statements)
    (sealed,) = [s for s in statements if s["Resource"] == {"Fn::GetAtt": [_breakglass_key(evidence), "Arn"]}]
    assert (sealed["Action"], sealed["Condition"]) == ("kms:Decrypt", PURPOSE_CONDITION)
    (evidence_key_id,) = [k for k in _of_type(evidence, "AWS::KMS::Key") if k != _breakglass_key(evidence)]
    (via_s3,) = [s for s in statements if s["Resource"] == {"Fn::GetAtt": [evidence_key_id, "Arn"]}]
    assert (via_s3["Action"], via_s3["Condition"]) == (
        "kms:Decrypt", {"StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"}})
    (recordings_id,) = [logical_id for logical_id in _worm_buckets(evidence) if "Recordings" in logical_id]
    (get,) = [s for s in statements if s["Action"] == "s3:GetObject"]
    assert _flat(get["Resource"]).endswith("/recordings/*")
    assert {"Fn::GetAtt": [recordings_id, "Arn"]} in get["Resource"]["Fn::Join"][1]
    (listing,) = [s for s in statements if s["Action"] == "s3:ListBucket"]
    assert listing["Resource"] == {"Fn::GetAtt": [recordings_id, "Arn"]}


# -- control plane -------------------------------------------------------------------------------


def test_control_plane_tables_are_recoverable_encrypted_and_protected(control_plane: Template) -> None:
    tables = _of_type(control_plane, "AWS::DynamoDB::Table")
    assert len(tables) == 2
    for table in tables.values():
        properties = table["Properties"]
        assert properties["KeySchema"] == [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ]
        assert properties["BillingMode"] == "PAY_PER_REQUEST"
        assert properties["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        assert properties["SSESpecification"]["SSEEnabled"] is True
        assert properties["SSESpecification"]["SSEType"] == "KMS"
        assert properties["DeletionProtectionEnabled"] is True
        assert table["DeletionPolicy"] == "Retain"
    ttl = [t["Properties"].get("TimeToLiveSpecification") for t in tables.values()]
    assert {"AttributeName": "expires_at", "Enabled": True} in ttl


def test_grants_are_signed_with_an_ecc_p256_kms_key_behind_a_fixed_alias(control_plane: Template) -> None:
    control_plane.has_resource_properties("AWS::KMS::Key", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"})
    control_plane.has_resource_properties("AWS::KMS::Alias", {"AliasName": "alias/proctor-grant-signing"})


API_HANDLER = "control_plane.api.lambda_handler"
GATEWAY_HANDLER = "control_plane.gateway_api.lambda_handler"
NOTIFIER_HANDLER = "control_plane.notifier.lambda_handler"


def _single(template: Template, resource_type: str) -> tuple[str, dict[str, Any]]:
    ((logical_id, resource),) = _of_type(template, resource_type).items()
    return logical_id, resource


def _state_machine(template: Template) -> tuple[str, dict[str, Any]]:
    return _single(template, "AWS::StepFunctions::StateMachine")


def _queues(template: Template) -> tuple[tuple[str, dict[str, Any]], tuple[str, dict[str, Any]]]:
    """(notifier queue, its dead-letter queue)."""
    queues = _of_type(template, "AWS::SQS::Queue")
    (main,) = [(k, q) for k, q in queues.items() if "RedrivePolicy" in q["Properties"]]
    (dead,) = [(k, q) for k, q in queues.items() if k != main[0]]
    return main, dead


def _link_key(template: Template) -> str:
    (logical_id,) = [
        k
        for k, r in _of_type(template, "AWS::SecretsManager::Secret").items()
        if r["Properties"].get("Name") == "proctor/approval-link-key"
    ]
    return logical_id


def test_only_the_gateway_function_reads_backend_secrets_and_only_under_proctor_prefix(control_plane: Template) -> None:
    link_key = {"Ref": _link_key(control_plane)}
    api_statements = _statements(control_plane, _role_of_function(control_plane, API_HANDLER))
    api_secrets = [s for s in api_statements if any(a.startswith("secretsmanager:") for a in _as_list(s["Action"]))]
    # The API function reads the approval link key (its confirmation page), nothing else.
    assert [(s["Effect"], s["Resource"]) for s in api_secrets] == [("Allow", link_key)]
    assert {"kms:Sign", "kms:GetPublicKey"} <= _actions(api_statements)

    gateway_statements = _statements(control_plane, _role_of_function(control_plane, GATEWAY_HANDLER))
    secret_statements = [
        s
        for s in gateway_statements
        if "secretsmanager:GetSecretValue" in _as_list(s["Action"]) and s["Effect"] == "Allow"
    ]
    assert [_as_list(s["Action"]) for s in secret_statements] == [["secretsmanager:GetSecretValue"]]
    (resource,) = _as_list(secret_statements[0]["Resource"])
    assert resource.endswith(f":{HOME_REGION}:123456789012:secret:proctor/*")
    # ...which would include the link key, so that one is denied outright.
    denied = [s for s in gateway_statements if s["Effect"] == "Deny"]
    assert [(s["Action"], s["Resource"]) for s in denied] == [("secretsmanager:GetSecretValue", link_key)]
    assert "kms:Sign" not in _actions(gateway_statements)


def test_control_plane_functions_write_only_audit_events(control_plane: Template) -> None:
    for handler in (API_HANDLER, GATEWAY_HANDLER, NOTIFIER_HANDLER):
        statements = _statements(control_plane, _role_of_function(control_plane, handler))
        s3_statements = [s for s in statements if any(a.startswith("s3:") for a in _as_list(s["Action"]))]
        assert [s["Action"] for s in s3_statements] == ["s3:PutObject"]
        objects = [_output_and_tail(r) for s in s3_statements for r in _as_list(s["Resource"])]
        assert objects == [("EvidenceBucketArn", "/events/*")]


def test_control_plane_functions_get_the_documented_environment(control_plane: Template) -> None:
    functions = {
        f["Properties"]["Handler"]: f["Properties"] for f in _of_type(control_plane, "AWS::Lambda::Function").values()
    }
    assert set(functions) == {API_HANDLER, GATEWAY_HANDLER, NOTIFIER_HANDLER}
    common = {
        "PROCTOR_CONFIG_TABLE",
        "PROCTOR_STATE_TABLE",
        "PROCTOR_EVIDENCE_BUCKET",
        "PROCTOR_GRANT_KEY_ID",
        "PROCTOR_REGION",
        "PROCTOR_ADMIN_GROUPS",
        "PROCTOR_APPROVER_GROUPS",
        "PROCTOR_GATEWAY_PRINCIPALS",
        "PROCTOR_APPROVAL_STATE_MACHINE_ARN",
        "PROCTOR_APPROVAL_LINK_KEY_SECRET",
        "POWERTOOLS_SERVICE_NAME",
        "POWERTOOLS_METRICS_NAMESPACE",
    }
    state_machine_id, _ = _state_machine(control_plane)
    for handler, function in functions.items():
        assert function["Runtime"] == "python3.12"
        assert function["TracingConfig"] == {"Mode": "Active"}
        environment = function["Environment"]["Variables"]
        notifier = {"PROCTOR_PUBLIC_BASE_URL", "PROCTOR_APPROVAL_EMAIL_SENDER"}
        assert set(environment) == (common | notifier if handler == NOTIFIER_HANDLER else common)
        assert environment["PROCTOR_ADMIN_GROUPS"] == "admins"
        assert environment["PROCTOR_APPROVER_GROUPS"] == "approvers"
        assert environment["PROCTOR_APPROVAL_STATE_MACHINE_ARN"] == {"Ref": state_machine_id}
        assert environment["PROCTOR_APPROVAL_LINK_KEY_SECRET"] == {"Ref": _link_key(control_plane)}
        assert environment["POWERTOOLS_SERVICE_NAME"] == (
            "proctor-approval-notifier" if handler == NOTIFIER_HANDLER else "proctor-control-plane"
        )
        assert environment["PROCTOR_GATEWAY_PRINCIPALS"] == (
            f"arn:aws:iam::123456789012:role/proctor-gateway-task-{HOME_REGION}"
        )
    notifier_env = functions[NOTIFIER_HANDLER]["Environment"]["Variables"]
    assert notifier_env["PROCTOR_APPROVAL_EMAIL_SENDER"] == "proctor@example.com"
    # Email links point at the deployed API stage.
    assert _flat(notifier_env["PROCTOR_PUBLIC_BASE_URL"]).startswith("https://")
    assert _flat(notifier_env["PROCTOR_PUBLIC_BASE_URL"]).endswith("/")


# -- approvals -----------------------------------------------------------------------------------


def test_the_state_machine_runs_exactly_the_python_definition(control_plane: Template) -> None:
    from control_plane.approval_workflow import definition

    _, state_machine = _state_machine(control_plane)
    (table_id,) = [
        k
        for k, t in _of_type(control_plane, "AWS::DynamoDB::Table").items()
        if t["Properties"].get("TimeToLiveSpecification")
    ]
    (queue_id, _), _ = _queues(control_plane)
    # Render the same definition with markers where the deployed names go, then swap the markers
    # for the intrinsic functions CloudFormation resolves.
    rendered = json.dumps(definition(state_table="@TABLE@", notifier_queue_url="@QUEUE@"))
    expected: list[Any] = []
    for piece in rendered.replace("@QUEUE@", "\0@QUEUE@\0").replace("@TABLE@", "\0@TABLE@\0").split("\0"):
        expected.append({"@TABLE@": {"Ref": table_id}, "@QUEUE@": {"Ref": queue_id}}.get(piece, piece))
    assert state_machine["Properties"]["DefinitionString"] == {"Fn::Join": ["", expected]}
    assert state_machine["Properties"]["StateMachineName"] == "proctor-approval"
    assert state_machine["Properties"]["TracingConfiguration"] == {"Enabled": True}
    logging = state_machine["Properties"]["LoggingConfiguration"]
    assert logging["Level"] == "ALL" and logging["IncludeExecutionData"] is False


def test_the_notifier_queue_is_encrypted_tls_only_and_dead_letters_failures(control_plane: Template) -> None:
    (queue_id, queue), (dead_id, dead) = _queues(control_plane)
    key_ids = set(_of_type(control_plane, "AWS::KMS::Key"))
    for q in (queue, dead):
        assert q["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0] in key_ids
    assert queue["Properties"]["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dead_id, "Arn"]},
        "maxReceiveCount": 5,
    }
    notifier_timeout = [
        f["Properties"]["Timeout"]
        for f in _of_type(control_plane, "AWS::Lambda::Function").values()
        if f["Properties"]["Handler"] == NOTIFIER_HANDLER
    ]
    assert queue["Properties"]["VisibilityTimeout"] >= 6 * notifier_timeout[0]
    policies = {
        p["Properties"]["Queues"][0]["Ref"]: p["Properties"]["PolicyDocument"]["Statement"]
        for p in _of_type(control_plane, "AWS::SQS::QueuePolicy").values()
    }
    for logical_id in (queue_id, dead_id):
        assert [
            s
            for s in policies[logical_id]
            if s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
        ], f"{logical_id} accepts plain HTTP"
    (mapping,) = _of_type(control_plane, "AWS::Lambda::EventSourceMapping").values()
    assert mapping["Properties"]["EventSourceArn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_approval_permissions_are_scoped_to_the_workflow(control_plane: Template) -> None:
    state_machine = {"Ref": _state_machine(control_plane)[0]}
    (queue_id, _), _ = _queues(control_plane)

    def granted(handler: str) -> dict[str, Any]:
        statements = _statements(control_plane, _role_of_function(control_plane, handler))
        return {a: s["Resource"] for s in statements for a in _as_list(s["Action"]) if a.startswith("states:")}

    assert granted(GATEWAY_HANDLER) == {"states:StartExecution": state_machine}
    assert granted(API_HANDLER) == {
        "states:StartExecution": state_machine,
        "states:SendTaskSuccess": state_machine,
        "states:SendTaskFailure": state_machine,
    }
    resume = {"states:SendTaskSuccess": state_machine, "states:SendTaskFailure": state_machine}
    assert granted(NOTIFIER_HANDLER) == resume

    notifier = _statements(control_plane, _role_of_function(control_plane, NOTIFIER_HANDLER))
    (send_email,) = [s for s in notifier if "ses:SendEmail" in _as_list(s["Action"])]
    assert send_email["Action"] == "ses:SendEmail"
    assert send_email["Condition"] == {"StringEquals": {"ses:FromAddress": "proctor@example.com"}}
    assert sorted(send_email["Resource"]) == [
        f"arn:aws:ses:{HOME_REGION}:123456789012:identity/example.com",
        f"arn:aws:ses:{HOME_REGION}:123456789012:identity/proctor@example.com",
    ]
    assert not {"kms:Sign", "secretsmanager:PutSecretValue"} & _actions(notifier)
    assert "ses:SendEmail" not in _actions(_statements(control_plane, _role_of_function(control_plane, API_HANDLER)))

    (machine,) = _of_type(control_plane, "AWS::StepFunctions::StateMachine").values()
    role_id = machine["Properties"]["RoleArn"]["Fn::GetAtt"][0]
    statements = _statements(control_plane, role_id)
    scoped = {a: s["Resource"] for s in statements if s["Resource"] != "*" for a in _as_list(s["Action"])}
    assert scoped["dynamodb:PutItem"]["Fn::GetAtt"][1] == "Arn"
    assert scoped["sqs:SendMessage"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert not [a for a in scoped if a.startswith(("dynamodb:Delete", "dynamodb:Get", "sqs:Receive", "states:"))]
    # Only log delivery and X-Ray, which have no resource-level permissions, are on `*`.
    unscoped = {a for s in statements if s["Resource"] == "*" for a in _as_list(s["Action"])}
    assert all(a.startswith(("logs:", "xray:")) for a in unscoped)


def test_the_link_key_is_a_generated_secret(control_plane: Template) -> None:
    secret = _of_type(control_plane, "AWS::SecretsManager::Secret")[_link_key(control_plane)]["Properties"]
    assert secret["GenerateSecretString"] == {"ExcludePunctuation": True, "PasswordLength": 64}


def test_gateway_routes_require_sigv4_and_the_public_routes_do_not(control_plane: Template) -> None:
    resources = {
        logical_id: r["Properties"]["PathPart"]
        for logical_id, r in _of_type(control_plane, "AWS::ApiGateway::Resource").items()
    }
    parents = {
        logical_id: r["Properties"]["ParentId"]
        for logical_id, r in _of_type(control_plane, "AWS::ApiGateway::Resource").items()
    }

    def path(logical_id: str) -> str:
        parent = parents[logical_id]
        prefix = path(parent["Ref"]) if isinstance(parent, dict) and "Ref" in parent else ""
        return f"{prefix}/{resources[logical_id]}"

    methods = {
        (m["Properties"]["HttpMethod"], path(m["Properties"]["ResourceId"]["Ref"])): m["Properties"]
        for m in _of_type(control_plane, "AWS::ApiGateway::Method").values()
    }
    assert set(methods) == {("ANY", "/v1/{proxy+}"), ("POST", "/v1/credentials"), ("ANY", "/v1/gateway/{proxy+}")}
    assert methods[("POST", "/v1/credentials")]["AuthorizationType"] == "AWS_IAM"
    assert methods[("ANY", "/v1/gateway/{proxy+}")]["AuthorizationType"] == "AWS_IAM"
    assert methods[("ANY", "/v1/{proxy+}")]["AuthorizationType"] == "NONE"
    assert all("RequestValidatorId" in m for m in methods.values())


def test_api_stage_logs_traces_and_throttles(control_plane: Template) -> None:
    control_plane.has_resource_properties(
        "AWS::ApiGateway::Stage",
        {
            "StageName": "prod",
            "TracingEnabled": True,
            "AccessLogSetting": Match.object_like({"DestinationArn": Match.any_value()}),
            "MethodSettings": [
                Match.object_like(
                    {
                        "HttpMethod": "*",
                        "ResourcePath": "/*",
                        "LoggingLevel": "ERROR",
                        "DataTraceEnabled": False,
                        "ThrottlingRateLimit": Match.any_value(),
                        "ThrottlingBurstLimit": Match.any_value(),
                    }
                )
            ],
        },
    )
    control_plane.resource_count_is("AWS::WAFv2::WebACLAssociation", 1)


# -- gateway -------------------------------------------------------------------------------------


def test_gateway_task_role_writes_only_recording_and_evidence_prefixes(gateway: Template) -> None:
    (task_role_id,) = [
        logical_id
        for logical_id, role in _of_type(gateway, "AWS::IAM::Role").items()
        if role["Properties"].get("RoleName") == f"proctor-gateway-task-{HOME_REGION}"
    ]
    statements = _statements(gateway, task_role_id)
    s3_statements = [s for s in statements if any(a.startswith("s3:") for a in _as_list(s["Action"]))]
    assert {a for s in s3_statements for a in _as_list(s["Action"])} == {"s3:PutObject", "s3:PutObjectRetention"}
    objects = sorted(_output_and_tail(r) for s in s3_statements for r in _as_list(s["Resource"]))
    assert objects == [
        ("EvidenceBucketArn", "/events/*"),
        ("EvidenceBucketArn", "/sessions/*"),
        ("RecordingsBucketArn", "/recordings/*"),
    ]

    invoke = [s for s in statements if "execute-api:Invoke" in _as_list(s["Action"])]
    routes = sorted(_output_and_tail(r) for s in invoke for r in _as_list(s["Resource"]))
    assert routes == [("ApiId", "/prod/*/v1/gateway/*"), ("ApiId", "/prod/POST/v1/credentials")]
    assert not [a for a in _actions(statements) if a.startswith("secretsmanager:") or a == "s3:GetObject"]


def _gateway_task_role(gateway: Template) -> str:
    (task_role_id,) = [
        logical_id
        for logical_id, role in _of_type(gateway, "AWS::IAM::Role").items()
        if role["Properties"].get("RoleName") == f"proctor-gateway-task-{HOME_REGION}"
    ]
    return task_role_id


def _stack_output(value: Any) -> str | None:
    return value.get("Fn::GetStackOutput", {}).get("OutputName") if isinstance(value, dict) else None


def test_gateway_may_generate_break_glass_data_keys_but_never_decrypt_them(gateway: Template) -> None:
    statements = _statements(gateway, _gateway_task_role(gateway))
    on_breakglass = [s for s in statements if _stack_output(s["Resource"]) == "BreakGlassKeyArn"]
    assert [(s["Action"], s["Condition"]) for s in on_breakglass] == [("kms:GenerateDataKey", PURPOSE_CONDITION)]
    decrypts = [s for s in statements if "kms:Decrypt" in _as_list(s["Action"])]
    assert [_stack_output(s["Resource"]) for s in decrypts] == ["EvidenceKeyArn"]  # SSE-KMS uploads, via S3 only
    assert all("kms:ViaService" in s["Condition"]["StringEquals"] for s in decrypts)
    kms_statements = [s for s in statements if any(a.startswith("kms:") for a in _as_list(s["Action"]))]
    assert not [s for s in kms_statements if s["Resource"] == "*"]

    (task,) = _of_type(gateway, "AWS::ECS::TaskDefinition").values()
    (container,) = task["Properties"]["ContainerDefinitions"]
    environment = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert _stack_output(environment["PROCTOR_BREAKGLASS_KEY_ID"]) == "BreakGlassKeyArn"


def test_gateway_service_runs_two_tasks_across_zones_with_rollback(gateway: Template) -> None:
    (service,) = _of_type(gateway, "AWS::ECS::Service").values()
    properties = service["Properties"]
    assert properties["DesiredCount"] >= 2
    assert properties["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert properties["DeploymentConfiguration"]["MinimumHealthyPercent"] == 100
    subnets = {s["Ref"] for s in properties["NetworkConfiguration"]["AwsvpcConfiguration"]["Subnets"]}
    zones = {_of_type(gateway, "AWS::EC2::Subnet")[s]["Properties"]["AvailabilityZone"] for s in subnets}
    assert len(zones) >= 2
    gateway.has_resource_properties(
        "AWS::ECS::Cluster", {"ClusterSettings": [{"Name": "containerInsights", "Value": "enabled"}]}
    )


def test_nlb_forwards_postgres_and_checks_readiness_on_the_admin_port(gateway: Template) -> None:
    gateway.has_resource_properties("AWS::ElasticLoadBalancingV2::Listener", {"Port": 5432, "Protocol": "TCP"})
    gateway.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {
            "Port": 5432,
            "Protocol": "TCP",
            "HealthCheckProtocol": "HTTP",
            "HealthCheckPort": "9090",
            "HealthCheckPath": "/readyz",
            "TargetGroupAttributes": Match.array_with(
                [{"Key": "deregistration_delay.timeout_seconds", "Value": "120"}]
            ),
        },
    )
    (listener,) = _of_type(gateway, "AWS::ElasticLoadBalancingV2::Listener").values()
    assert listener["Properties"]["Port"] == 5432


def test_nlb_sticks_clients_to_a_task_by_source_ip_so_cancel_reaches_the_session(gateway: Template) -> None:
    (target_group,) = _of_type(gateway, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    attributes = {a["Key"]: a["Value"] for a in target_group["Properties"]["TargetGroupAttributes"]}
    assert attributes["stickiness.enabled"] == "true"
    assert attributes["stickiness.type"] == "source_ip"


def test_gateway_container_gets_settings_as_env_and_tls_from_secrets_manager(gateway: Template) -> None:
    (task,) = _of_type(gateway, "AWS::ECS::TaskDefinition").values()
    (container,) = task["Properties"]["ContainerDefinitions"]
    environment = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert {
        "PROCTOR_API_URL",
        "PROCTOR_REGION",
        "PROCTOR_RECORDINGS_BUCKET",
        "PROCTOR_EVIDENCE_BUCKET",
    } <= set(environment)
    assert environment["PROCTOR_SPOOL_DIR"] == "/var/spool/proctor"
    assert environment["PROCTOR_PG_LISTEN"] == "0.0.0.0:5432"
    assert environment["PROCTOR_ADMIN_LISTEN"] == "0.0.0.0:9090"
    secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
    assert set(secrets) == {"PROCTOR_TLS_CERT_PEM", "PROCTOR_TLS_KEY_PEM", "PROCTOR_MASKING_HASH_KEY"}
    assert ":secret:proctor/gateway-tls:" in json.dumps(secrets["PROCTOR_TLS_CERT_PEM"])
    assert ":secret:proctor/masking-hash-key" in json.dumps(secrets["PROCTOR_MASKING_HASH_KEY"])
    assert container["StopTimeout"] == 120
    assert container["ReadonlyRootFilesystem"] is True
    assert {p["ContainerPort"] for p in container["PortMappings"]} == {5432, 9090}


# -- assets and compliance -----------------------------------------------------------------------


def _asset_dirs(synthesized: Synthesized) -> Iterator[Path]:
    return (p for p in synthesized.outdir.iterdir() if p.name.startswith("asset.") and p.is_dir())


def test_assets_carry_only_what_runs(synthesized: Synthesized) -> None:
    contents = [sorted(p.name for p in asset.iterdir()) for asset in _asset_dirs(synthesized)]
    assert ["control_plane"] in contents  # the Lambda code: the control_plane package alone
    (image,) = [c for c in contents if "Dockerfile" in c]
    assert not {".venv", "node_modules", "cdk.out", ".git", "build", "tests", "infra"} & set(image)


def test_synth_needs_no_lookups(synthesized: Synthesized) -> None:
    manifest = json.loads((synthesized.outdir / "manifest.json").read_text())
    assert not manifest.get("missing"), "the CLI would need AWS credentials for these context lookups"


def test_cdk_nag_reports_no_unacknowledged_findings(synthesized: Synthesized) -> None:
    report = synthesized.validation_report()
    violations = [
        (plugin["pluginName"], v["ruleName"], [c.get("constructPath") for c in v["violatingConstructs"]])
        for plugin in report["pluginReports"]
        for v in plugin.get("violations", [])
    ]
    assert synthesized.error is None, f"synth failed: {synthesized.error}\n{violations}"
    assert not [v for v in violations if v[0] == "AwsSolutions"]
    direct = AwsSolutionsChecks().validate_scope(synthesized.app)
    assert direct.success, [v.rule_name for v in direct.violations]


def test_every_acknowledged_finding_says_why(synthesized: Synthesized) -> None:
    acknowledgments = {
        (construct.node.path, rule): reason
        for construct in synthesized.app.node.find_all()
        for entry in construct.node.metadata
        if entry.type == Validations.ACKNOWLEDGED_RULES_METADATA_KEY
        for rule, reason in entry.data.items()
    }
    ours = {key: reason for key, reason in acknowledgments.items() if "AwsSolutions-" in key[1]}
    assert ours, "no cdk-nag acknowledgments found: is the pack wired?"
    for (path, rule), reason in acknowledgments.items():
        assert reason.strip(), f"{rule} on {path} has no reason"
    for (path, rule), reason in ours.items():
        assert len(reason.split()) >= 8, f"{rule} on {path}: reason too thin: {reason!r}"


# -- context -------------------------------------------------------------------------------------


def test_a_missing_lambda_layer_fails_synth_with_the_fix(tmp_path: Path) -> None:
    app = App(context=_context(tmp_path / "not-built"), outdir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"build-lambda-layer\.sh"):
        build(app)


def test_context_lists_accept_cli_strings_and_json_lists() -> None:
    from_cli = ProctorSettings.from_context(App(context={"proctor:gatewayRegions": "us-east-1, eu-west-1"}).node)
    from_json = ProctorSettings.from_context(App(context={"proctor:gatewayRegions": ["us-east-1", "eu-west-1"]}).node)
    assert from_cli.gateway_regions == from_json.gateway_regions == ("us-east-1", "eu-west-1")
    defaults = ProctorSettings.from_context(App().node)
    assert (defaults.account, defaults.region, defaults.gateway_regions) == (
        "123456789012",
        "us-east-1",
        ("us-east-1",),
    )
