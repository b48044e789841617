"""One regional gateway fleet: Fargate tasks behind a Network Load Balancer, recording to the WORM buckets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from control_plane.contract import EVENTS_PREFIX, RECORDINGS_PREFIX, SESSIONS_PREFIX
from infra.compliance import acknowledge, acknowledge_wildcards
from infra.constructs.break_glass import PURPOSE_CONDITION
from infra.constructs.control_plane_endpoint import ControlPlaneEndpoint
from infra.settings import REPO_ROOT

POSTGRES_PORT = 5432
ADMIN_PORT = 9090
SPOOL_DIR = "/var/spool/proctor"
CONTAINER_NAME = "gateway"
# ECS stops a task in this order: deregister (NLB drains for DEREGISTRATION_DELAY), SIGTERM, then
# SIGKILL after STOP_TIMEOUT. The gateway finishes sessions and flushes its spool in between.
DEREGISTRATION_DELAY = Duration.seconds(120)
STOP_TIMEOUT = Duration.seconds(120)  # Fargate's maximum
TLS_CERT_FIELD = "cert_pem"
TLS_KEY_FIELD = "key_pem"


def gateway_task_role_name(region: str) -> str:
    """Fixed, so the control plane can name the gateways it trusts without depending on their stacks."""
    return f"proctor-gateway-task-{region}"


@dataclass(frozen=True)
class GatewayServiceProps:
    vpc: ec2.IVpc
    control_plane: ControlPlaneEndpoint
    recordings_bucket: s3.IBucket
    evidence_bucket: s3.IBucket
    evidence_key: kms.IKey
    breakglass_key_arn: str
    tls_secret_name: str
    masking_key_secret_name: str
    desired_count: int
    client_cidrs: Sequence[str]
    internet_facing: bool
    log_retention: logs.RetentionDays


class GatewayService(Construct):
    def __init__(self, scope: Construct, construct_id: str, props: GatewayServiceProps) -> None:
        super().__init__(scope, construct_id)
        if props.desired_count < 2:
            raise ValueError("the gateway runs at least 2 tasks, one per availability zone")
        self._props = props
        stack = Stack.of(self)

        self.task_role = self._task_role(stack)
        self.cluster = ecs.Cluster(self, "Cluster", vpc=props.vpc, container_insights_v2=ecs.ContainerInsights.ENABLED)
        self.task_definition = self._task_definition(stack)

        self.load_balancer_security_group = ec2.SecurityGroup(
            self,
            "LoadBalancerSecurityGroup",
            vpc=props.vpc,
            description="Proctor gateway NLB: clients in, gateway tasks out",
            allow_all_outbound=False,
        )
        if not props.client_cidrs:
            raise ValueError("the gateway needs the client CIDRs allowed to reach its load balancer")
        for cidr in props.client_cidrs:
            self.load_balancer_security_group.add_ingress_rule(
                ec2.Peer.ipv4(cidr), ec2.Port.tcp(POSTGRES_PORT), "PostgreSQL clients"
            )
        service_security_group = ec2.SecurityGroup(
            self,
            "ServiceSecurityGroup",
            vpc=props.vpc,
            description="Proctor gateway tasks: NLB in, backends and AWS APIs out",
            # Backends (databases, hosts, clusters) are configured at runtime, anywhere the VPC routes to.
            allow_all_outbound=True,
        )
        self.service = ecs.FargateService(
            self,
            "Service",
            cluster=self.cluster,
            task_definition=self.task_definition,
            desired_count=props.desired_count,
            # Never dip below the desired count during a deployment: sessions are long-lived.
            min_healthy_percent=100,
            max_healthy_percent=200,
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            security_groups=[service_security_group],
            assign_public_ip=False,
            health_check_grace_period=Duration.seconds(60),
            availability_zone_rebalancing=ecs.AvailabilityZoneRebalancing.ENABLED,
            enable_execute_command=False,
            propagate_tags=ecs.PropagatedTagSource.SERVICE,
        )
        for port in (POSTGRES_PORT, ADMIN_PORT):
            self.service.connections.allow_from(
                self.load_balancer_security_group, ec2.Port.tcp(port), "from the gateway NLB"
            )
        self.load_balancer = self._load_balancer()

    # -- identity --------------------------------------------------------------------------------

    def _task_role(self, stack: Stack) -> iam.Role:
        props = self._props
        role = iam.Role(
            self,
            "TaskRole",
            role_name=gateway_task_role_name(stack.region),
            description="Proctor gateway tasks: write recordings and evidence, call the gateway routes",
            assumed_by=iam.ServicePrincipal(
                "ecs-tasks.amazonaws.com",
                conditions={
                    # Confused-deputy guard: only ECS tasks of this account and region.
                    "StringEquals": {"aws:SourceAccount": stack.account},
                    "ArnLike": {
                        "aws:SourceArn": stack.format_arn(
                            service="ecs", resource="*", arn_format=ArnFormat.NO_RESOURCE_NAME
                        )
                    },
                },
            ),
        )
        evidence_writes = iam.PolicyStatement(
            actions=["s3:PutObject", "s3:PutObjectRetention"],
            resources=[
                props.recordings_bucket.arn_for_objects(f"{RECORDINGS_PREFIX}/*"),
                props.evidence_bucket.arn_for_objects(f"{EVENTS_PREFIX}/*"),
                props.evidence_bucket.arn_for_objects(f"{SESSIONS_PREFIX}/*"),
            ],
        )
        role.add_to_policy(evidence_writes)
        acknowledge_wildcards(
            role,
            evidence_writes,
            "Recording chunks, event batches and session index rows get new keys per session/batch "
            "(recordings/dt=/<session>/<chunk>, events|sessions/dt=/region=/...); the grant is write-only "
            "and limited to those three prefixes, and Object Lock keeps written versions immutable.",
        )
        role.add_to_policy(iam.PolicyStatement(actions=["kms:GenerateDataKey"], resources=[props.evidence_key.key_arn]))
        role.add_to_policy(
            iam.PolicyStatement(
                # Completing a multipart upload under SSE-KMS decrypts the data key; only via S3.
                actions=["kms:Decrypt"],
                resources=[props.evidence_key.key_arn],
                conditions={"StringEquals": {"kms:ViaService": f"s3.{props.evidence_bucket.env.region}.amazonaws.com"}},
            )
        )
        # Seal unmasked originals: new data keys only, never kms:Decrypt (that is the break-glass role's).
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kms:GenerateDataKey"], resources=[props.breakglass_key_arn], conditions=PURPOSE_CONDITION
            )
        )
        invoke_gateway_routes = iam.PolicyStatement(
            actions=["execute-api:Invoke"], resources=props.control_plane.gateway_route_arns(stack)
        )
        role.add_to_policy(invoke_gateway_routes)
        acknowledge_wildcards(
            role,
            invoke_gateway_routes,
            "Only the gateway routes of the control-plane API: POST /v1/credentials and the /v1/gateway/ "
            "proxy resource, whose sub-paths the control plane defines.",
        )
        return role

    # -- task ------------------------------------------------------------------------------------

    def _task_definition(self, stack: Stack) -> ecs.FargateTaskDefinition:
        props = self._props
        task_definition = ecs.FargateTaskDefinition(
            self,
            "TaskDefinition",
            family="proctor-gateway",
            cpu=1024,
            memory_limit_mib=2048,
            runtime_platform=ecs.RuntimePlatform(
                cpu_architecture=ecs.CpuArchitecture.X86_64,
                operating_system_family=ecs.OperatingSystemFamily.LINUX,
            ),
            task_role=self.task_role,
            volumes=[ecs.Volume(name="spool"), ecs.Volume(name="tmp")],
        )
        log_group = logs.LogGroup(self, "Logs", retention=props.log_retention, removal_policy=RemovalPolicy.RETAIN)
        tls = secretsmanager.Secret.from_secret_name_v2(self, "TlsSecret", props.tls_secret_name)
        # The tenant's keyed-hash masking key: one secret for every region, so hashes join across them.
        masking_key = secretsmanager.Secret.from_secret_name_v2(self, "MaskingKeySecret",
                                                                props.masking_key_secret_name)
        container = task_definition.add_container(
            CONTAINER_NAME,
            # Built from the repository's Dockerfile at deploy time; synth only fingerprints the directory.
            image=ecs.ContainerImage.from_asset(
                str(REPO_ROOT), file="Dockerfile", platform=ecr_assets.Platform.LINUX_AMD64
            ),
            logging=ecs.LogDrivers.aws_logs(
                stream_prefix="gateway", log_group=log_group, mode=ecs.AwsLogDriverMode.NON_BLOCKING
            ),
            environment={
                "PROCTOR_API_URL": props.control_plane.url,
                # SigV4 for execute-api signs with the API's region, which may differ from the gateway's.
                "PROCTOR_API_REGION": props.control_plane.region,
                "PROCTOR_REGION": stack.region,
                "PROCTOR_RECORDINGS_BUCKET": props.recordings_bucket.bucket_name,
                "PROCTOR_EVIDENCE_BUCKET": props.evidence_bucket.bucket_name,
                "PROCTOR_EVIDENCE_REGION": props.evidence_bucket.env.region,
                "PROCTOR_BREAKGLASS_KEY_ID": props.breakglass_key_arn,
                "PROCTOR_SPOOL_DIR": SPOOL_DIR,
                "PROCTOR_PG_LISTEN": f"0.0.0.0:{POSTGRES_PORT}",
                "PROCTOR_ADMIN_LISTEN": f"0.0.0.0:{ADMIN_PORT}",
            },
            secrets={
                "PROCTOR_TLS_CERT_PEM": ecs.Secret.from_secrets_manager(tls, field=TLS_CERT_FIELD),
                "PROCTOR_TLS_KEY_PEM": ecs.Secret.from_secrets_manager(tls, field=TLS_KEY_FIELD),
                "PROCTOR_MASKING_HASH_KEY": ecs.Secret.from_secrets_manager(masking_key),
            },
            port_mappings=[
                ecs.PortMapping(container_port=POSTGRES_PORT, name="postgres"),
                ecs.PortMapping(container_port=ADMIN_PORT, name="admin"),
            ],
            stop_timeout=STOP_TIMEOUT,
            readonly_root_filesystem=True,
        )
        container.add_mount_points(
            ecs.MountPoint(container_path=SPOOL_DIR, source_volume="spool", read_only=False),
            # The container's own /tmp, writable while the root filesystem is read-only.
            ecs.MountPoint(container_path="/tmp", source_volume="tmp", read_only=False),  # noqa: S108
        )
        acknowledge(
            task_definition,
            "AwsSolutions-ECS2",
            "The environment holds only non-secret settings (API URL, bucket names, listen addresses); "
            "the TLS certificate and key and the masking hash key come from Secrets Manager as ECS secrets.",
        )
        execution_role = task_definition.obtain_execution_role()
        acknowledge(
            execution_role,
            "AwsSolutions-IAM5[Resource::*]",
            "ecr:GetAuthorizationToken, added by ECS to pull the gateway image, supports no resource-level "
            "permissions.",
        )
        return task_definition

    # -- load balancer ---------------------------------------------------------------------------

    def _load_balancer(self) -> elbv2.NetworkLoadBalancer:
        props = self._props
        load_balancer = elbv2.NetworkLoadBalancer(
            self,
            "LoadBalancer",
            vpc=props.vpc,
            internet_facing=props.internet_facing,
            cross_zone_enabled=True,
            security_groups=[self.load_balancer_security_group],
            vpc_subnets=ec2.SubnetSelection(
                subnet_type=ec2.SubnetType.PUBLIC if props.internet_facing else ec2.SubnetType.PRIVATE_WITH_EGRESS
            ),
        )
        acknowledge(
            load_balancer,
            "AwsSolutions-ELB2",
            "NLB access logs exist only for TLS listeners; this listener is TCP because the gateway "
            "terminates TLS itself (PostgreSQL SSLRequest / direct TLS), and it records every connection "
            "and statement as evidence.",
        )
        target_group = elbv2.NetworkTargetGroup(
            self,
            "PostgresTargets",
            vpc=props.vpc,
            port=POSTGRES_PORT,
            protocol=elbv2.Protocol.TCP,
            target_type=elbv2.TargetType.IP,
            # The gateway records the client's address as evidence.
            preserve_client_ip=True,
            deregistration_delay=DEREGISTRATION_DELAY,
            connection_termination=True,
            health_check=elbv2.HealthCheck(
                protocol=elbv2.Protocol.HTTP,
                port=str(ADMIN_PORT),
                path="/readyz",
                interval=Duration.seconds(10),
                timeout=Duration.seconds(5),
                healthy_threshold_count=2,
                unhealthy_threshold_count=2,
            ),
            targets=[self.service.load_balancer_target(container_name=CONTAINER_NAME, container_port=POSTGRES_PORT)],
        )
        # A PostgreSQL CancelRequest arrives on a new connection and only the task holding the session
        # knows its backend keys: source-IP stickiness sends it to that task.
        target_group.set_attribute("stickiness.enabled", "true")
        target_group.set_attribute("stickiness.type", "source_ip")
        load_balancer.add_listener(
            "Postgres", port=POSTGRES_PORT, protocol=elbv2.Protocol.TCP, default_target_groups=[target_group]
        )
        return load_balancer
