"""One gateway fleet per region: its VPC (created, or an existing one by id) and the Fargate service."""

from __future__ import annotations

from aws_cdk import CfnOutput, Environment, RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.constructs.gateway_service import GatewayService, GatewayServiceProps
from infra.settings import ProctorSettings
from infra.stacks.control_plane_stack import ControlPlaneStack
from infra.stacks.evidence_stack import EvidenceStack


class GatewayStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env: Environment,
        settings: ProctorSettings,
        evidence: EvidenceStack,
        control_plane: ControlPlaneStack,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=env,
            description=f"Proctor gateway fleet in {env.region}: ECS Fargate behind an NLB",
        )
        vpc = self._vpc(settings)
        self.gateway = GatewayService(
            self,
            "Gateway",
            GatewayServiceProps(
                vpc=vpc,
                control_plane=control_plane.endpoint_for(self),
                recordings_bucket=evidence.recordings_bucket_for(self),
                evidence_bucket=evidence.evidence_bucket_for(self),
                evidence_key=evidence.evidence_key_for(self),
                breakglass_key_arn=evidence.breakglass_key_arn_for(self),
                tls_secret_name=settings.tls_secret_name,
                masking_key_secret_name=settings.masking_key_secret_name,
                desired_count=settings.gateway_desired_count,
                client_cidrs=settings.client_cidrs or (self._vpc_cidr(settings, vpc),),
                internet_facing=settings.gateway_internet_facing,
                log_retention=settings.log_retention,
            ),
        )
        CfnOutput(
            self,
            "PostgresEndpoint",
            value=f"{self.gateway.load_balancer.load_balancer_dns_name}:5432",
            description="Point psql/JDBC here (sslmode=require, password = grant)",
        )

    @staticmethod
    def _vpc_cidr(settings: ProctorSettings, vpc: ec2.IVpc) -> str:
        """By default only clients in the VPC (and networks routed into it) reach the gateway."""
        # A literal either way: a looked-up VPC's CIDR comes from cdk.context.json.
        return vpc.vpc_cidr_block if settings.vpc_id else settings.vpc_cidr

    def _vpc(self, settings: ProctorSettings) -> ec2.IVpc:
        if settings.vpc_id:
            # A lookup: `cdk synth` then needs credentials once, and cdk.context.json must be committed.
            return ec2.Vpc.from_lookup(self, "Vpc", vpc_id=settings.vpc_id)
        zones = [f"{self.region}a", f"{self.region}b"]
        # Pin the zones in context (before any child exists): otherwise ec2.Vpc looks them up.
        self.node.set_context(f"availability-zones:account={self.account}:region={self.region}", zones)
        flow_logs = logs.LogGroup(
            self, "VpcFlowLogs", retention=settings.log_retention, removal_policy=RemovalPolicy.RETAIN
        )
        return ec2.Vpc(
            self,
            "Vpc",
            availability_zones=zones,
            ip_addresses=ec2.IpAddresses.cidr(settings.vpc_cidr),
            nat_gateways=2,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(name="gateway", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=22),
            ],
            flow_logs={
                "all": ec2.FlowLogOptions(
                    destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs),
                    traffic_type=ec2.FlowLogTrafficType.ALL,
                )
            },
        )
