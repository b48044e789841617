"""Per-invocation audit trail of the control plane: events are collected while a request is
served and written once, as one batch, when it ends."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger

from control_plane.contract import write_event_batch

logger = Logger(child=True)


class EvidenceLog:
    def __init__(self, s3: Any, bucket: str, region: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.region = region
        self.pending: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append(row)

    def flush(self) -> list[str]:
        if not self.pending:
            return []
        rows, self.pending = self.pending, []
        try:
            return write_event_batch(self.s3, self.bucket, rows)
        except Exception:
            # The API answer is already decided; losing the audit row must be loud.
            logger.exception("evidence write failed", extra={"events": len(rows)})
            raise
