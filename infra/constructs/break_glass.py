"""The break-glass key and the one role that may open what it seals.

The gateways seal the unmasked originals of masked results under data keys of this key
(data_plane.core.sealed). They may only generate such data keys; decrypting them is reserved to
the break-glass role, assumed by a person with MFA, for `proctor evidence reprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from control_plane.contract import RECORDINGS_PREFIX, SEALED_CONTEXT_PURPOSE, SEALED_PURPOSE
from infra.compliance import acknowledge_wildcards

BREAKGLASS_ROLE_NAME = "proctor-breakglass"
BREAKGLASS_KEY_ALIAS = "alias/proctor-breakglass"
# Every grant on this key names what the data keys are for, so no other use can borrow it.
PURPOSE_CONDITION = {"StringEquals": {f"kms:EncryptionContext:{SEALED_CONTEXT_PURPOSE}": SEALED_PURPOSE}}


@dataclass(frozen=True)
class BreakGlassProps:
    recordings_bucket: s3.IBucket
    evidence_key: kms.IKey


class BreakGlass(Construct):
    def __init__(self, scope: Construct, construct_id: str, props: BreakGlassProps) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        # A literal ARN (the role's name is fixed): the key policy then needs no reference to the role.
        self.role_arn = stack.format_arn(service="iam", region="", resource="role", resource_name=BREAKGLASS_ROLE_NAME)
        self.key = kms.Key(
            self,
            "Key",
            description="Proctor break-glass: seals the unmasked originals of masked results",
            alias=BREAKGLASS_KEY_ALIAS,
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        # An explicit deny in the key policy: no IAM policy or KMS grant opens the originals for anyone else.
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyTheBreakGlassRoleDecrypts",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["kms:Decrypt", "kms:ReEncryptFrom"],
                resources=["*"],
                conditions={"ArnNotEquals": {"aws:PrincipalArn": self.role_arn}},
            )
        )
        self.role = self._role(props)

    def _role(self, props: BreakGlassProps) -> iam.Role:
        role = iam.Role(
            self,
            "Role",
            role_name=BREAKGLASS_ROLE_NAME,
            description="Proctor break-glass: read recordings and decrypt the sealed unmasked originals",
            assumed_by=iam.AccountRootPrincipal().with_conditions(
                {"Bool": {"aws:MultiFactorAuthPresent": "true"}}
            ),
            max_session_duration=Duration.hours(1),
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["kms:Decrypt"], resources=[self.key.key_arn], conditions=PURPOSE_CONDITION)
        )
        read_recordings = iam.PolicyStatement(
            actions=["s3:GetObject"], resources=[props.recordings_bucket.arn_for_objects(f"{RECORDINGS_PREFIX}/*")]
        )
        role.add_to_policy(read_recordings)
        acknowledge_wildcards(
            role,
            read_recordings,
            "Recording chunks are keyed per session and chunk (recordings/dt=/<session>/<chunk>); the role "
            "reads them to reprocess a session and holds no write, delete or retention permission.",
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["s3:ListBucket"],
                resources=[props.recordings_bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": f"{RECORDINGS_PREFIX}/*"}},
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                # The recordings bucket is SSE-KMS under the evidence key: reading objects decrypts through S3.
                actions=["kms:Decrypt"],
                resources=[props.evidence_key.key_arn],
                conditions={"StringEquals": {"kms:ViaService": f"s3.{Stack.of(self).region}.amazonaws.com"}},
            )
        )
        return role
