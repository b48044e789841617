"""The approval workflow's Amazon States Language definition, built once here and deployed as is:
the CDK app hands it to Step Functions (`DefinitionBody.from_string`) and the local stack creates
the same definition in moto's interpreter. JSONPath states only (moto does not run JSONata).

    Prepare → RecordRequest (dynamodb:putItem)
            → WaitForDecision (sqs:sendMessage.waitForTaskToken, TimeoutSecondsPath)
                 ├ success                    → Approved ┐
                 ├ Proctor.ApprovalDenied     → Denied   ├→ RecordOutcome (dynamodb:putItem)
                 ├ States.Timeout             → Expired  │   → NotifyOutcome (sqs:sendMessage) → end
                 └ any other error            → Failed   ┘

The task token travels only to the notifier queue; the notifier keeps it server-side. An approval
resumes the task with SendTaskSuccess, a denial with SendTaskFailure(error=DENIED_ERROR). The
workflow writes its own records next to the approval (`pk=APPROVAL#<id>`, `sk=WORKFLOW#...`,
the JSON document in `doc` as every state-table item), so the outcome stands even if no API call
ever looks at the approval again. No AWS imports: this is data.
"""

from __future__ import annotations

from typing import Any

DENIED_ERROR = "Proctor.ApprovalDenied"
MESSAGE_REQUESTED = "approval.requested"
MESSAGE_CLOSED = "approval.closed"
WORKFLOW_REQUESTED_SK = "WORKFLOW#requested"
WORKFLOW_OUTCOME_SK = "WORKFLOW#outcome"

# Transient errors of the two service integrations worth a retry (never the callback's outcome).
_DYNAMODB_RETRY = ["DynamoDB.AmazonDynamoDBException", "DynamoDB.ProvisionedThroughputExceededException",
                   "DynamoDB.InternalServerErrorException", "DynamoDB.ThrottlingException"]
_SQS_RETRY = ["SQS.AmazonSQSException", "SQS.SdkClientException"]


def _retry(errors: list[str]) -> list[dict[str, Any]]:
    return [{"ErrorEquals": errors, "IntervalSeconds": 1, "MaxAttempts": 3, "BackoffRate": 2}]


def _record(table: str, sort_key: str, next_state: str) -> dict[str, Any]:
    """A dynamodb:putItem of `$.record` (as a JSON string) under the approval's partition."""
    return {
        "Type": "Task",
        "Resource": "arn:aws:states:::dynamodb:putItem",
        "Parameters": {
            "TableName": table,
            "Item": {
                "pk": {"S.$": "States.Format('APPROVAL#{}', $.approval_id)"},
                "sk": {"S": sort_key},
                "doc": {"S.$": "States.JsonToString($.record)"},
                "expires_at": {"N.$": "States.Format('{}', $.retain_until)"},
            },
        },
        "ResultPath": None,
        "Retry": _retry(_DYNAMODB_RETRY),
        "Next": next_state,
    }


def _outcome(status: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "Type": "Pass",
        "Parameters": {"status": status, "at.$": "$$.State.EnteredTime", "execution_arn.$": "$$.Execution.Id",
                       **(extra or {})},
        "ResultPath": "$.record",
        "Next": "RecordOutcome",
    }


def definition(*, state_table: str, notifier_queue_url: str) -> dict[str, Any]:
    """The state machine. Its input: `{"approval_id", "kind", "timeout_seconds", "retain_until"}`
    (`retain_until`: epoch seconds for the records' TTL attribute)."""
    return {
        "Comment": "Proctor approval: record the request, wait for a decision or the timeout, record it",
        "StartAt": "Prepare",
        "States": {
            "Prepare": {
                "Type": "Pass",
                "Parameters": {"status": "requested", "at.$": "$$.State.EnteredTime",
                               "execution_arn.$": "$$.Execution.Id", "kind.$": "$.kind",
                               "timeout_seconds.$": "$.timeout_seconds"},
                "ResultPath": "$.record",
                "Next": "RecordRequest",
            },
            "RecordRequest": _record(state_table, WORKFLOW_REQUESTED_SK, "WaitForDecision"),
            "WaitForDecision": {
                "Type": "Task",
                "Resource": "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
                "Parameters": {
                    "QueueUrl": notifier_queue_url,
                    "MessageBody": {
                        "type": MESSAGE_REQUESTED,
                        "approval_id.$": "$.approval_id",
                        "execution_arn.$": "$$.Execution.Id",
                        "task_token.$": "$$.Task.Token",
                    },
                },
                "TimeoutSecondsPath": "$.timeout_seconds",
                "ResultPath": "$.decision",
                "Retry": _retry(_SQS_RETRY),
                "Catch": [
                    {"ErrorEquals": [DENIED_ERROR], "ResultPath": "$.error", "Next": "Denied"},
                    {"ErrorEquals": ["States.Timeout"], "ResultPath": "$.error", "Next": "Expired"},
                    {"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Failed"},
                ],
                "Next": "Approved",
            },
            "Approved": _outcome("approved", {"decision.$": "$.decision"}),
            "Denied": _outcome("denied", {"error.$": "$.error"}),
            "Expired": _outcome("expired"),
            # Fail closed: a workflow that cannot wait for a decision denies.
            "Failed": _outcome("denied", {"error.$": "$.error"}),
            "RecordOutcome": _record(state_table, WORKFLOW_OUTCOME_SK, "NotifyOutcome"),
            "NotifyOutcome": {
                "Type": "Task",
                "Resource": "arn:aws:states:::sqs:sendMessage",
                "Parameters": {
                    "QueueUrl": notifier_queue_url,
                    "MessageBody": {
                        "type": MESSAGE_CLOSED,
                        "approval_id.$": "$.approval_id",
                        "status.$": "$.record.status",
                        "execution_arn.$": "$$.Execution.Id",
                    },
                },
                "ResultPath": None,
                "Retry": _retry(_SQS_RETRY),
                "End": True,
            },
        },
    }


def execution_input(*, approval_id: str, kind: str, timeout_seconds: int, retain_until: int) -> dict[str, Any]:
    return {"approval_id": approval_id, "kind": kind, "timeout_seconds": int(timeout_seconds),
            "retain_until": int(retain_until)}
