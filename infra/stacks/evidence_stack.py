"""The evidence boundary: WORM buckets, their key, the Athena catalog, and the break-glass key and role.
Deployed once, in the home region."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Environment, Stack
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.constructs.break_glass import BreakGlass, BreakGlassProps
from infra.constructs.evidence_store import EvidenceStore, EvidenceStoreProps
from infra.stacks.shared_values import share


class EvidenceStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env: Environment,
        retention_days: int,
        gateway_regions: Sequence[str],
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=env,
            description="Proctor evidence: Object Lock buckets for recordings and audit events, Athena catalog",
            termination_protection=True,
        )
        self.store = EvidenceStore(
            self, "EvidenceStore", EvidenceStoreProps(retention_days=retention_days, regions=gateway_regions)
        )
        self.break_glass = BreakGlass(
            self,
            "BreakGlass",
            BreakGlassProps(recordings_bucket=self.store.recordings_bucket, evidence_key=self.store.key),
        )

    def evidence_bucket_for(self, consumer: Stack) -> s3.IBucket:
        return self._bucket_for(consumer, "Evidence", self.store.evidence_bucket)

    def recordings_bucket_for(self, consumer: Stack) -> s3.IBucket:
        return self._bucket_for(consumer, "Recordings", self.store.recordings_bucket)

    def evidence_key_for(self, consumer: Stack) -> kms.IKey:
        key_arn = share(
            self.store.key.key_arn,
            producer=self,
            name="EvidenceKeyArn",
            consumer=consumer,
            description="KMS key of the evidence and recordings buckets",
        )
        return kms.Key.from_key_arn(consumer, "EvidenceKey", key_arn)

    def breakglass_key_arn_for(self, consumer: Stack) -> str:
        return share(
            self.break_glass.key.key_arn,
            producer=self,
            name="BreakGlassKeyArn",
            consumer=consumer,
            description="KMS key that seals the unmasked originals of masked results (break-glass)",
        )

    def _bucket_for(self, consumer: Stack, kind: str, bucket: s3.IBucket) -> s3.IBucket:
        return s3.Bucket.from_bucket_attributes(
            consumer,
            f"{kind}Bucket",
            region=self.region,
            account=self.account,
            bucket_arn=share(
                bucket.bucket_arn,
                producer=self,
                name=f"{kind}BucketArn",
                consumer=consumer,
                description=f"{kind} bucket ARN",
            ),
            bucket_name=share(
                bucket.bucket_name,
                producer=self,
                name=f"{kind}BucketName",
                consumer=consumer,
                description=f"{kind} bucket (Object Lock, COMPLIANCE)",
            ),
        )
