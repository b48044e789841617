"""The control-plane boundary: API, functions, state and the grant-signing key. Deployed once, in the home region."""

from __future__ import annotations

from aws_cdk import CfnOutput, Environment, Stack
from constructs import Construct

from infra.constructs.approval_workflow import ApprovalWorkflow, ApprovalWorkflowProps
from infra.constructs.control_plane_api import ControlPlaneApi, ControlPlaneApiProps
from infra.constructs.control_plane_endpoint import ControlPlaneEndpoint
from infra.constructs.gateway_service import gateway_task_role_name
from infra.settings import ProctorSettings
from infra.stacks.evidence_stack import EvidenceStack
from infra.stacks.shared_values import share


class ControlPlaneStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env: Environment,
        settings: ProctorSettings,
        evidence: EvidenceStack,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=env,
            description="Proctor control plane: API Gateway, Lambda, DynamoDB, grant-signing key, approval workflow",
        )
        self._stage_name = settings.api_stage_name
        # Role ARNs built from the gateways' fixed role names: no dependency on the gateway stacks.
        gateway_principals = [
            self.format_arn(service="iam", region="", resource="role", resource_name=gateway_task_role_name(region))
            for region in settings.gateway_regions
        ]
        self.control_plane = ControlPlaneApi(
            self,
            "ControlPlane",
            ControlPlaneApiProps(
                evidence_bucket=evidence.evidence_bucket_for(self),
                evidence_key=evidence.evidence_key_for(self),
                lambda_layer_dir=settings.lambda_layer_dir,
                admin_groups=settings.admin_groups,
                approver_groups=settings.approver_groups,
                gateway_principals=[*gateway_principals, *settings.extra_gateway_principals],
                stage_name=settings.api_stage_name,
                throttle_rate=settings.api_throttle_rate,
                throttle_burst=settings.api_throttle_burst,
                log_retention=settings.log_retention,
            ),
        )
        api = self.control_plane
        self.approvals = ApprovalWorkflow(
            self,
            "Approvals",
            ApprovalWorkflowProps(
                state_table=api.state_table,
                config_table=api.config_table,
                table_key=api.table_key,
                evidence_bucket=api.evidence_bucket,
                evidence_key=api.evidence_key,
                layer=api.layer,
                environment=api.environment,
                # Email links point at the API (or the custom domain in front of it).
                public_base_url=settings.public_base_url or api.api.url,
                email_sender=settings.approval_email_sender,
                log_retention=settings.log_retention,
            ),
        )
        self.approvals.allow_requests([api.gateway_function, api.api_function])
        self.approvals.allow_decisions(api.api_function)
        self.approvals.deny_link_key(api.gateway_function)
        CfnOutput(self, "ApiUrl", value=api.api.url, description="Control-plane API base URL")
        CfnOutput(
            self,
            "ApprovalStateMachineArn",
            value=self.approvals.state_machine.state_machine_arn,
            description="Approval workflow",
        )

    def endpoint_for(self, consumer: Stack) -> ControlPlaneEndpoint:
        rest_api_id = share(
            self.control_plane.api.rest_api_id,
            producer=self,
            name="ApiId",
            consumer=consumer,
            description="Control-plane REST API id",
        )
        return ControlPlaneEndpoint(rest_api_id, self._stage_name, region=self.region, account=self.account)
