"""The approval workflow: Step Functions (the definition from `control_plane.approval_workflow`,
deployed as is), the notifier queue and its dead-letter queue, the notifier Lambda (SES email
links), and the secret that signs those links.

Who may do what: the state machine puts items into the state table and sends to the queue; the
gateway function starts executions (statement holds), the API function starts them (access
requests) and resumes them (SendTaskSuccess/Failure) and reads the link key; the notifier reads
the link key, emails from one sender address only, and resumes an execution decided before its
task token arrived.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from control_plane.approval_workflow import definition
from infra.compliance import acknowledge
from infra.constructs.control_plane_api import (
    control_plane_function,
    grant_evidence_writes,
    grant_tables,
    role_of,
)

NOTIFIER_HANDLER = "control_plane.notifier.lambda_handler"
STATE_MACHINE_NAME = "proctor-approval"
LINK_KEY_SECRET_NAME = "proctor/approval-link-key"  # noqa: S105 - a secret's name
NOTIFIER_TIMEOUT = Duration.seconds(60)
# Longer than the longest approval (7 days, `ApprovalRule.timeout_seconds`): the workflow times
# its wait out itself; this only bounds a stuck execution.
EXECUTION_TIMEOUT = Duration.days(8)


@dataclass(frozen=True)
class ApprovalWorkflowProps:
    state_table: dynamodb.ITable
    config_table: dynamodb.ITable
    table_key: kms.IKey
    evidence_bucket: s3.IBucket
    evidence_key: kms.IKey
    layer: lambda_.ILayerVersion
    environment: dict[str, str]
    public_base_url: str
    email_sender: str
    log_retention: logs.RetentionDays


class ApprovalWorkflow(Construct):
    def __init__(self, scope: Construct, construct_id: str, props: ApprovalWorkflowProps) -> None:
        super().__init__(scope, construct_id)
        self._props = props

        self.queue_key = kms.Key(
            self,
            "QueueKey",
            description="Proctor approval notifier queue (messages carry Step Functions task tokens)",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.dead_letters = sqs.Queue(
            self,
            "NotifierDeadLetters",
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=self.queue_key,
            enforce_ssl=True,
            retention_period=Duration.days(14),
        )
        acknowledge(
            self.dead_letters,
            "AwsSolutions-SQS3",
            "This is the dead-letter queue of the approval notifier queue; a dead-letter queue needs none of its own.",
        )
        self.queue = sqs.Queue(
            self,
            "NotifierQueue",
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=self.queue_key,
            enforce_ssl=True,
            # AWS's advice for Lambda event sources: six times the function timeout.
            visibility_timeout=Duration.seconds(NOTIFIER_TIMEOUT.to_seconds() * 6),
            dead_letter_queue=sqs.DeadLetterQueue(queue=self.dead_letters, max_receive_count=5),
        )

        self.link_key = secretsmanager.Secret(
            self,
            "LinkKey",
            secret_name=LINK_KEY_SECRET_NAME,
            description="HMAC key of approval email links and their CSRF tokens",
            generate_secret_string=secretsmanager.SecretStringGenerator(password_length=64, exclude_punctuation=True),
            removal_policy=RemovalPolicy.DESTROY,
        )
        acknowledge(
            self.link_key,
            "AwsSolutions-SMG4",
            "Rotating the link key only invalidates outstanding approval links (approvers then decide through "
            "the API); rotate it by hand with put-secret-value, functions re-read it within five minutes.",
        )

        self.state_machine = self._state_machine()
        self.notifier = self._notifier()

    # -- the state machine ----------------------------------------------------------------------

    def _state_machine(self) -> sfn.StateMachine:
        props = self._props
        logs_group = logs.LogGroup(
            self, "StateMachineLogs", retention=props.log_retention, removal_policy=RemovalPolicy.RETAIN
        )
        role = iam.Role(
            self,
            "StateMachineRole",
            assumed_by=iam.ServicePrincipal("states.amazonaws.com"),
            description="Proctor approval workflow: record to the state table, message the notifier",
        )
        body = json.dumps(definition(state_table=props.state_table.table_name, notifier_queue_url=self.queue.queue_url))
        state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            state_machine_name=STATE_MACHINE_NAME,
            definition_body=sfn.DefinitionBody.from_string(body),
            role=role,
            timeout=EXECUTION_TIMEOUT,
            tracing_enabled=True,
            # Execution data holds task tokens and statements: keep it out of the logs.
            logs=sfn.LogOptions(destination=logs_group, level=sfn.LogLevel.ALL, include_execution_data=False),
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=["dynamodb:PutItem"], resources=[props.state_table.table_arn])
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["kms:Encrypt", "kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"],
                resources=[props.table_key.key_arn],
                conditions={"StringEquals": {"kms:ViaService": f"dynamodb.{Stack.of(self).region}.amazonaws.com"}},
            )
        )
        # What SendMessage to a KMS-encrypted queue needs, without CDK's wildcard actions.
        role.add_to_principal_policy(iam.PolicyStatement(actions=["sqs:SendMessage"], resources=[self.queue.queue_arn]))
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=["kms:GenerateDataKey", "kms:Decrypt"], resources=[self.queue_key.key_arn])
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "Step Functions log delivery (logs:CreateLogDelivery, …) and X-Ray (xray:PutTraceSegments, …) "
            "support no resource-level permissions; CDK adds them for the logging and tracing configured here.",
        )
        return state_machine

    # -- the notifier ---------------------------------------------------------------------------

    def _notifier(self) -> lambda_.Function:
        props = self._props
        function = control_plane_function(
            self,
            "Notifier",
            NOTIFIER_HANDLER,
            layer=props.layer,
            environment=props.environment
            | self.function_environment()
            | {
                "PROCTOR_PUBLIC_BASE_URL": props.public_base_url,
                "PROCTOR_APPROVAL_EMAIL_SENDER": props.email_sender,
                "POWERTOOLS_SERVICE_NAME": "proctor-approval-notifier",
            },
            log_retention=props.log_retention,
            timeout=NOTIFIER_TIMEOUT,
        )
        function.add_event_source(
            event_sources.SqsEventSource(self.queue, batch_size=10, report_batch_item_failures=True)
        )
        role = role_of(function)
        grant_tables(role, props.table_key, read_write=(props.state_table,), read_only=(props.config_table,))
        grant_evidence_writes(role, props.evidence_bucket, props.evidence_key)
        self.link_key.grant_read(role)
        role.add_to_principal_policy(self._resume_statement())
        role.add_to_principal_policy(self._send_email_statement())
        return function

    def _resume_statement(self) -> iam.PolicyStatement:
        """The callback's two answers (no heartbeats: the workflow's wait has no heartbeat)."""
        return iam.PolicyStatement(
            actions=["states:SendTaskSuccess", "states:SendTaskFailure"],
            resources=[self.state_machine.state_machine_arn],
        )

    def _send_email_statement(self) -> iam.PolicyStatement:
        """ses:SendEmail as the configured sender only: its address identity or its domain's."""
        stack = Stack.of(self)
        sender = self._props.email_sender
        identities = [sender, sender.split("@", 1)[1]]
        return iam.PolicyStatement(
            actions=["ses:SendEmail"],
            resources=[
                stack.format_arn(service="ses", resource="identity", resource_name=identity) for identity in identities
            ],
            conditions={"StringEquals": {"ses:FromAddress": sender}},
        )

    # -- what the API functions get ---------------------------------------------------------------

    def function_environment(self) -> dict[str, str]:
        return {
            "PROCTOR_APPROVAL_STATE_MACHINE_ARN": self.state_machine.state_machine_arn,
            "PROCTOR_APPROVAL_LINK_KEY_SECRET": self.link_key.secret_arn,
        }

    def allow_requests(self, functions: Sequence[lambda_.Function]) -> None:
        """Start executions (a gateway's held statement, a person's access request)."""
        for function in functions:
            self.state_machine.grant_start_execution(role_of(function))
            for name, value in self.function_environment().items():
                function.add_environment(name, value)

    def allow_decisions(self, function: lambda_.Function) -> None:
        """Resume executions and serve the email link's page (which needs the link key)."""
        role = role_of(function)
        role.add_to_principal_policy(self._resume_statement())
        self.link_key.grant_read(role)

    def deny_link_key(self, function: lambda_.Function) -> None:
        """For a role granted `proctor/*` secrets (the gateway function's backend credentials)."""
        statement = iam.PolicyStatement(
            effect=iam.Effect.DENY,
            actions=["secretsmanager:GetSecretValue"],
            resources=[self.link_key.secret_arn],
        )
        role_of(function).add_to_principal_policy(statement)
