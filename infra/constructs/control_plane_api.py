"""The control plane: API Gateway in front of two Lambda functions, DynamoDB state, the grant-signing key.

People and pipelines call `/v1/...` with their OIDC token (the function validates it). Gateways call
`POST /v1/credentials` and `/v1/gateway/...` signed with their task role (AWS_IAM): only that function
may read backend secrets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from control_plane.contract import EVENTS_PREFIX
from infra.compliance import acknowledge, acknowledge_wildcards
from infra.constructs.api_firewall import ApiFirewall
from infra.settings import REPO_ROOT

GRANT_KEY_ALIAS = "alias/proctor-grant-signing"
API_HANDLER = "control_plane.api.lambda_handler"
GATEWAY_HANDLER = "control_plane.gateway_api.lambda_handler"
# The layer is built for this runtime and CPU by scripts/build-lambda-layer.sh.
RUNTIME = lambda_.Runtime.PYTHON_3_12
ARCHITECTURE = lambda_.Architecture.X86_64
# Only the control_plane package goes into the function asset.
FUNCTION_ASSET_EXCLUDE = ["*", ".*", "!control_plane", "!control_plane/**", "__pycache__", "*.pyc"]

TABLE_READ = [
    "dynamodb:GetItem",
    "dynamodb:BatchGetItem",
    "dynamodb:Query",
    "dynamodb:Scan",
    "dynamodb:ConditionCheckItem",
    "dynamodb:DescribeTable",
]
TABLE_WRITE = ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem"]
# What DynamoDB needs from its callers on a customer-managed table key (CDK's grant set, no wildcards).
TABLE_KEY_USE = [
    "kms:Decrypt",
    "kms:DescribeKey",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
]
XRAY_REASON = "X-Ray PutTraceSegments/PutTelemetryRecords support no resource-level permissions (Resource: *)."


@dataclass(frozen=True)
class ControlPlaneApiProps:
    evidence_bucket: s3.IBucket
    evidence_key: kms.IKey
    lambda_layer_dir: Path
    admin_groups: Sequence[str]
    approver_groups: Sequence[str]
    gateway_principals: Sequence[str]
    stage_name: str
    throttle_rate: int
    throttle_burst: int
    log_retention: logs.RetentionDays


class ControlPlaneApi(Construct):
    def __init__(self, scope: Construct, construct_id: str, props: ControlPlaneApiProps) -> None:
        super().__init__(scope, construct_id)
        self._props = props
        stack = Stack.of(self)

        self.table_key = kms.Key(
            self,
            "TableKey",
            description="Proctor control plane: configuration and request/approval state",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.config_table = self._table("ConfigTable", ttl_attribute=None)
        self.state_table = self._table("StateTable", ttl_attribute="expires_at")
        self.grant_key = kms.Key(
            self,
            "GrantSigningKey",
            description="Proctor grant signing (ES256): gateways verify grants offline with the public key",
            key_spec=kms.KeySpec.ECC_NIST_P256,
            key_usage=kms.KeyUsage.SIGN_VERIFY,
            alias=GRANT_KEY_ALIAS,
            removal_policy=RemovalPolicy.RETAIN,
        )

        layer = self._dependencies_layer(props.lambda_layer_dir)
        environment = {
            "PROCTOR_CONFIG_TABLE": self.config_table.table_name,
            "PROCTOR_STATE_TABLE": self.state_table.table_name,
            "PROCTOR_EVIDENCE_BUCKET": props.evidence_bucket.bucket_name,
            "PROCTOR_GRANT_KEY_ID": self.grant_key.key_arn,
            "PROCTOR_REGION": stack.region,
            "PROCTOR_ADMIN_GROUPS": ",".join(props.admin_groups),
            "PROCTOR_APPROVER_GROUPS": ",".join(props.approver_groups),
            "PROCTOR_GATEWAY_PRINCIPALS": ",".join(props.gateway_principals),
            "POWERTOOLS_SERVICE_NAME": "proctor-control-plane",
            "POWERTOOLS_METRICS_NAMESPACE": "Proctor",
        }
        self.layer = layer
        self.environment = environment
        self.evidence_bucket = props.evidence_bucket
        self.evidence_key = props.evidence_key
        self.api_function = control_plane_function(
            self, "ApiFunction", API_HANDLER, layer=layer, environment=environment, log_retention=props.log_retention
        )
        self.gateway_function = control_plane_function(
            self,
            "GatewayFunction",
            GATEWAY_HANDLER,
            layer=layer,
            environment=environment,
            log_retention=props.log_retention,
        )
        self._grant_api_function()
        self._grant_gateway_function()

        self.api = self._rest_api()
        ApiFirewall(
            self,
            "Firewall",
            stage_arn=self.api.deployment_stage.stage_arn,
            # ~10 requests/s sustained per client IP; a whole office or CI fleet may share one NAT IP.
            requests_per_5_min=3000,
        )

    # -- state -----------------------------------------------------------------------------------

    def _table(self, construct_id: str, ttl_attribute: str | None) -> dynamodb.Table:
        return dynamodb.Table(
            self,
            construct_id,
            partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="sk", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=self.table_key,
            time_to_live_attribute=ttl_attribute,
            deletion_protection=True,
            removal_policy=RemovalPolicy.RETAIN,
        )

    # -- functions -------------------------------------------------------------------------------

    def _dependencies_layer(self, layer_dir: Path) -> lambda_.LayerVersion:
        if not (layer_dir / "python").is_dir():
            raise FileNotFoundError(
                f"Lambda layer directory {layer_dir}/python is missing: run scripts/build-lambda-layer.sh "
                "first (or point the `proctor:lambdaLayerDir` context at a built layer)."
            )
        return lambda_.LayerVersion(
            self,
            "Dependencies",
            code=lambda_.Code.from_asset(str(layer_dir)),
            compatible_runtimes=[RUNTIME],
            compatible_architectures=[ARCHITECTURE],
            description="aws-lambda-powertools, pydantic, pyjwt, cryptography",
        )

    def _grant_api_function(self) -> None:
        role = role_of(self.api_function)
        grant_tables(role, self.table_key, read_write=(self.config_table, self.state_table), read_only=())
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=["kms:Sign", "kms:GetPublicKey"], resources=[self.grant_key.key_arn])
        )
        grant_evidence_writes(role, self._props.evidence_bucket, self._props.evidence_key)

    def _grant_gateway_function(self) -> None:
        role = role_of(self.gateway_function)
        grant_tables(role, self.table_key, read_write=(self.state_table,), read_only=(self.config_table,))
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=["kms:GetPublicKey"], resources=[self.grant_key.key_arn])
        )
        grant_evidence_writes(role, self._props.evidence_bucket, self._props.evidence_key)
        backend_secrets = iam.PolicyStatement(
            actions=["secretsmanager:GetSecretValue"],
            resources=[
                Stack.of(self).format_arn(
                    service="secretsmanager",
                    resource="secret",
                    resource_name="proctor/*",
                    arn_format=ArnFormat.COLON_RESOURCE_NAME,
                )
            ],
        )
        role.add_to_principal_policy(backend_secrets)
        acknowledge_wildcards(
            role,
            backend_secrets,
            "Backend credentials are secrets that operators create per target under the `proctor/` name "
            "prefix after deploy; their names (and ARN suffixes) are not known at synth time.",
        )

    # -- API -------------------------------------------------------------------------------------

    def _rest_api(self) -> apigw.RestApi:
        props = self._props
        access_logs = logs.LogGroup(
            self, "ApiAccessLogs", retention=props.log_retention, removal_policy=RemovalPolicy.RETAIN
        )
        api = apigw.RestApi(
            self,
            "Api",
            rest_api_name="proctor-control-plane",
            description="Proctor control plane: targets, policies, grants, approvals, credentials",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            # Execution logging (below) needs the account-level CloudWatch role of API Gateway.
            cloud_watch_role=True,
            cloud_watch_role_removal_policy=RemovalPolicy.RETAIN,
            deploy_options=apigw.StageOptions(
                stage_name=props.stage_name,
                access_log_destination=apigw.LogGroupLogDestination(access_logs),
                access_log_format=apigw.AccessLogFormat.json_with_standard_fields(
                    caller=True,
                    http_method=True,
                    ip=True,
                    protocol=True,
                    request_time=True,
                    resource_path=True,
                    response_length=True,
                    status=True,
                    user=True,
                ),
                tracing_enabled=True,
                logging_level=apigw.MethodLoggingLevel.ERROR,
                # Request bodies carry tokens and policies: never log them.
                data_trace_enabled=False,
                metrics_enabled=True,
                throttling_rate_limit=props.throttle_rate,
                throttling_burst_limit=props.throttle_burst,
            ),
        )
        cloud_watch_role = api.node.try_find_child("CloudWatchRole")
        if cloud_watch_role is not None:
            acknowledge(
                cloud_watch_role,
                "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                "AmazonAPIGatewayPushToCloudWatchLogs]",
                "API Gateway's account-level logging role; the AWS managed policy is the one AWS documents "
                "for it and is limited to CloudWatch Logs.",
            )
        # Bodies are checked against a model where a method declares one; the functions validate
        # every body with pydantic anyway.
        validator = api.add_request_validator(
            "RequestValidator",
            request_validator_name="proctor-request",
            validate_request_parameters=True,
            validate_request_body=True,
        )
        proxy_parameters = {"method.request.path.proxy": True}
        v1 = api.root.add_resource("v1")

        people = v1.add_resource("{proxy+}").add_method(
            "ANY",
            apigw.LambdaIntegration(self.api_function, allow_test_invoke=False),
            authorization_type=apigw.AuthorizationType.NONE,
            request_validator=validator,
            request_parameters=proxy_parameters,
        )
        oidc_reason = (
            "Callers are people and CI pipelines holding OIDC tokens from several issuers (IdP, GitHub "
            "Actions, GitLab, Cognito); the function validates each token itself (JWKS, issuer, audience, "
            "expiry, pinned algorithms) so no API Gateway authorizer applies."
        )
        acknowledge(people, "AwsSolutions-APIG4", oidc_reason)
        acknowledge(people, "AwsSolutions-COG4", oidc_reason)

        gateway_integration = apigw.LambdaIntegration(self.gateway_function, allow_test_invoke=False)
        credentials = v1.add_resource("credentials").add_method(
            "POST",
            gateway_integration,
            authorization_type=apigw.AuthorizationType.IAM,
            request_validator=validator,
        )
        gateway_routes = (
            v1.add_resource("gateway")
            .add_resource("{proxy+}")
            .add_method(
                "ANY",
                gateway_integration,
                authorization_type=apigw.AuthorizationType.IAM,
                request_validator=validator,
                request_parameters=proxy_parameters,
            )
        )
        for method in (credentials, gateway_routes):
            acknowledge(
                method,
                "AwsSolutions-COG4",
                "Only gateways call this route; they sign requests with their ECS task role (AWS_IAM), "
                "and the function checks the caller against PROCTOR_GATEWAY_PRINCIPALS.",
            )
        return api


# -- what every control-plane function shares (the approval workflow's notifier included) ----------


def control_plane_function(
    scope: Construct,
    construct_id: str,
    handler: str,
    *,
    layer: lambda_.ILayerVersion,
    environment: dict[str, str],
    log_retention: logs.RetentionDays,
    timeout: Duration | None = None,
) -> lambda_.Function:
    """A function of the control_plane package: own role, own retained log group, X-Ray."""
    log_group = logs.LogGroup(
        scope,
        f"{construct_id}Logs",
        retention=log_retention,
        removal_policy=RemovalPolicy.RETAIN,
    )
    role = iam.Role(
        scope,
        f"{construct_id}Role",
        assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
        description=f"Proctor control plane: {handler}",
    )
    function = lambda_.Function(
        scope,
        construct_id,
        runtime=RUNTIME,
        architecture=ARCHITECTURE,
        handler=handler,
        code=lambda_.Code.from_asset(str(REPO_ROOT), exclude=FUNCTION_ASSET_EXCLUDE),
        layers=[layer],
        role=role,
        log_group=log_group,
        environment=dict(environment),
        memory_size=512,
        # API Gateway gives up after 29 s.
        timeout=timeout or Duration.seconds(28),
        tracing=lambda_.Tracing.ACTIVE,
    )
    role.add_to_policy(
        iam.PolicyStatement(actions=["logs:CreateLogStream", "logs:PutLogEvents"], resources=[log_group.log_group_arn])
    )
    acknowledge(role, "AwsSolutions-IAM5[Resource::*]", XRAY_REASON)
    acknowledge(
        function,
        "AwsSolutions-L1",
        "Pinned to Python 3.12: the dependency layer is built for it (scripts/build-lambda-layer.sh "
        "--python-version 3.12); bump both together.",
    )
    return function


def role_of(function: lambda_.Function) -> iam.IRole:
    if function.role is None:
        raise AssertionError("control-plane functions are created with an explicit role")
    return function.role


def grant_tables(
    role: iam.IRole,
    table_key: kms.IKey,
    *,
    read_write: Sequence[dynamodb.ITable],
    read_only: Sequence[dynamodb.ITable],
) -> None:
    if read_write:
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=TABLE_READ + TABLE_WRITE, resources=[table.table_arn for table in read_write])
        )
    if read_only:
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=TABLE_READ, resources=[table.table_arn for table in read_only])
        )
    role.add_to_principal_policy(
        iam.PolicyStatement(
            actions=TABLE_KEY_USE,
            resources=[table_key.key_arn],
            conditions={"StringEquals": {"kms:ViaService": f"dynamodb.{Stack.of(table_key).region}.amazonaws.com"}},
        )
    )


def grant_evidence_writes(role: iam.IRole, bucket: s3.IBucket, key: kms.IKey) -> None:
    """Audit events only: `events/*` of the evidence bucket, never recordings or reads."""
    put_events = iam.PolicyStatement(actions=["s3:PutObject"], resources=[bucket.arn_for_objects(f"{EVENTS_PREFIX}/*")])
    role.add_to_principal_policy(put_events)
    role.add_to_principal_policy(
        iam.PolicyStatement(actions=["kms:GenerateDataKey", "kms:Encrypt"], resources=[key.key_arn])
    )
    acknowledge_wildcards(
        role,
        put_events,
        "Event objects are keyed events/dt=<date>/region=<region>/<batch>.jsonl.gz; the grant is "
        "scoped to the events/ prefix, write-only, and Object Lock keeps existing versions immutable.",
    )
