"""Where evidence lives: WORM buckets for recordings and audit events, and the Athena view over them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_athena as athena
from aws_cdk import aws_glue as glue
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from control_plane.contract import (
    EVENT_COLUMNS,
    EVENTS_PREFIX,
    PARTITION_COLUMNS,
    SESSION_COLUMNS,
    SESSIONS_PREFIX,
)
from infra.compliance import acknowledge
from infra.constructs.evidence_queries import GLUE_DATABASE, NAMED_QUERIES

# Evidence starts here; partition projection needs a fixed lower bound.
PROJECTION_START_DATE = "2024-01-01"
ATHENA_WORKGROUP = "proctor-evidence"


@dataclass(frozen=True)
class EvidenceStoreProps:
    retention_days: int
    regions: Sequence[str]


class EvidenceStore(Construct):
    """Recordings and evidence buckets under Object Lock (COMPLIANCE), a Glue catalog, an Athena workgroup."""

    def __init__(self, scope: Construct, construct_id: str, props: EvidenceStoreProps) -> None:
        super().__init__(scope, construct_id)
        if not props.regions:
            raise ValueError("EvidenceStore needs at least one gateway region for partition projection")

        self.key = kms.Key(
            self,
            "EvidenceKey",
            description="Proctor evidence: recordings, audit events and Athena results",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.access_logs_bucket = s3.Bucket(
            self,
            "AccessLogsBucket",
            # S3 server access logging cannot deliver to SSE-KMS buckets.
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            versioned=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            removal_policy=RemovalPolicy.RETAIN,
        )
        acknowledge(
            self.access_logs_bucket,
            "AwsSolutions-S1",
            "This bucket is the server access log destination of the evidence buckets; "
            "logging it into itself would recurse.",
        )
        self.recordings_bucket = self._worm_bucket("RecordingsBucket", "recordings/", props.retention_days)
        self.evidence_bucket = self._worm_bucket("EvidenceBucket", "evidence/", props.retention_days)
        self.results_bucket = s3.Bucket(
            self,
            "AthenaResultsBucket",
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            versioned=True,
            server_access_logs_bucket=self.access_logs_bucket,
            server_access_logs_prefix="athena-results/",
            # Query results are copies of evidence, not evidence: keep them briefly.
            lifecycle_rules=[
                s3.LifecycleRule(expiration=Duration.days(30), noncurrent_version_expiration=Duration.days(1))
            ],
            removal_policy=RemovalPolicy.RETAIN,
        )

        self.database = glue.CfnDatabase(
            self,
            "Database",
            catalog_id=Stack.of(self).account,
            database_input=glue.CfnDatabase.DatabaseInputProperty(
                name=GLUE_DATABASE,
                description="Proctor evidence: OCSF-shaped audit events and session index",
            ),
        )
        self.events_table = self._evidence_table("EventsTable", EVENTS_PREFIX, EVENT_COLUMNS, props.regions)
        self.sessions_table = self._evidence_table("SessionsTable", SESSIONS_PREFIX, SESSION_COLUMNS, props.regions)
        self.workgroup = self._workgroup()

    def _worm_bucket(self, construct_id: str, log_prefix: str, retention_days: int) -> s3.Bucket:
        return s3.Bucket(
            self,
            construct_id,
            object_lock_enabled=True,
            # COMPLIANCE: nobody, root included, can shorten retention or delete a locked version.
            object_lock_default_retention=s3.ObjectLockRetention.compliance(Duration.days(retention_days)),
            versioned=True,
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.access_logs_bucket,
            server_access_logs_prefix=log_prefix,
            removal_policy=RemovalPolicy.RETAIN,
        )

    def _evidence_table(
        self,
        construct_id: str,
        prefix: str,
        columns: Sequence[tuple[str, str]],
        regions: Sequence[str],
    ) -> glue.CfnTable:
        location = f"s3://{self.evidence_bucket.bucket_name}/{prefix}/"
        table = glue.CfnTable(
            self,
            construct_id,
            catalog_id=Stack.of(self).account,
            database_name=GLUE_DATABASE,
            table_input=glue.CfnTable.TableInputProperty(
                name=prefix,
                description=f"Proctor evidence: s3://<evidence bucket>/{prefix}/dt=/region=/*.jsonl.gz",
                table_type="EXTERNAL_TABLE",
                parameters={
                    "classification": "json",
                    "compressionType": "gzip",
                    "typeOfData": "file",
                    # Partition projection: Athena computes partitions, no crawler, no MSCK REPAIR.
                    "projection.enabled": "true",
                    "projection.dt.type": "date",
                    "projection.dt.format": "yyyy-MM-dd",
                    "projection.dt.range": f"{PROJECTION_START_DATE},NOW",
                    "projection.dt.interval": "1",
                    "projection.dt.interval.unit": "DAYS",
                    "projection.region.type": "enum",
                    "projection.region.values": ",".join(regions),
                    "storage.location.template": location + "dt=${dt}/region=${region}/",
                },
                partition_keys=[_column(name, kind) for name, kind in PARTITION_COLUMNS],
                storage_descriptor=glue.CfnTable.StorageDescriptorProperty(
                    columns=[_column(name, kind) for name, kind in columns],
                    location=location,
                    input_format="org.apache.hadoop.mapred.TextInputFormat",
                    output_format="org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat",
                    compressed=True,
                    serde_info=glue.CfnTable.SerdeInfoProperty(
                        serialization_library="org.openx.data.jsonserde.JsonSerDe",
                        # A truncated or foreign line must not hide the rest of the evidence.
                        parameters={"ignore.malformed.json": "true", "case.insensitive": "false"},
                    ),
                ),
            ),
        )
        table.add_resource_dependency(self.database)
        return table

    def _workgroup(self) -> athena.CfnWorkGroup:
        workgroup = athena.CfnWorkGroup(
            self,
            "Workgroup",
            name=ATHENA_WORKGROUP,
            description="Auditors' queries over Proctor evidence",
            state="ENABLED",
            recursive_delete_option=False,
            work_group_configuration=athena.CfnWorkGroup.WorkGroupConfigurationProperty(
                enforce_work_group_configuration=True,
                publish_cloud_watch_metrics_enabled=True,
                result_configuration=athena.CfnWorkGroup.ResultConfigurationProperty(
                    output_location=f"s3://{self.results_bucket.bucket_name}/results/",
                    encryption_configuration=athena.CfnWorkGroup.EncryptionConfigurationProperty(
                        encryption_option="SSE_KMS", kms_key=self.key.key_arn
                    ),
                ),
            ),
        )
        for name, query in NAMED_QUERIES.items():
            named = athena.CfnNamedQuery(
                self,
                f"Query-{name}",
                name=name,
                description=query.description,
                database=GLUE_DATABASE,
                query_string=query.sql,
                work_group=workgroup.name,
            )
            named.add_resource_dependency(workgroup)
        return workgroup


def _column(name: str, kind: str) -> glue.CfnTable.ColumnProperty:
    return glue.CfnTable.ColumnProperty(name=name, type=kind)
