"""The control-plane boundary: API, functions, state and the grant-signing key. Deployed once, in the home region."""

from __future__ import annotations

from aws_cdk import CfnOutput, Environment, Stack
from constructs import Construct

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
            description="Proctor control plane: API Gateway, Lambda, DynamoDB, grant-signing key",
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
        CfnOutput(self, "ApiUrl", value=self.control_plane.api.url, description="Control-plane API base URL")

    def endpoint_for(self, consumer: Stack) -> ControlPlaneEndpoint:
        rest_api_id = share(
            self.control_plane.api.rest_api_id,
            producer=self,
            name="ApiId",
            consumer=consumer,
            description="Control-plane REST API id",
        )
        return ControlPlaneEndpoint(rest_api_id, self._stage_name, region=self.region, account=self.account)
