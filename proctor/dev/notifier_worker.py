"""The local stand-in for the notifier Lambda's SQS event source: a thread long-polls the queue,
hands each batch to the same handler in the same SQS event shape, and deletes what the handler did
not report as a batch item failure (those come back after the visibility timeout)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from proctor.dev.adapter import LambdaContext

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
log = logging.getLogger(__name__)


def sqs_event(messages: list[dict[str, Any]], queue_arn: str, region: str) -> dict[str, Any]:
    """What Lambda's SQS event source hands a function."""
    return {"Records": [{
        "messageId": m["MessageId"],
        "receiptHandle": m["ReceiptHandle"],
        "body": m["Body"],
        "attributes": dict(m.get("Attributes") or {}),
        "messageAttributes": dict(m.get("MessageAttributes") or {}),
        "md5OfBody": m.get("MD5OfBody") or hashlib.md5(m["Body"].encode(), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    } for m in messages]}


class NotifierWorker:
    def __init__(self, sqs: Any, queue_url: str, handler: Handler, *, region: str, batch_size: int = 10,
                 wait_seconds: int = 1) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.handler = handler
        self.region = region
        self.batch_size = batch_size
        self.wait_seconds = wait_seconds
        self.queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> int:
        """Receive one batch and hand it to the handler; returns how many messages it held."""
        messages = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=self.batch_size,
                                            WaitTimeSeconds=self.wait_seconds,
                                            AttributeNames=["All"]).get("Messages", [])
        if not messages:
            return 0
        try:
            result = self.handler(sqs_event(messages, self.queue_arn, self.region),
                                  LambdaContext("proctor-approval-notifier")) or {}
        except Exception:
            log.exception("notifier handler failed; the batch will be redelivered")
            return len(messages)
        failed = {f["itemIdentifier"] for f in result.get("batchItemFailures") or ()}
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)])
        return len(messages)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.poll_once() and not self.wait_seconds:
                    self._stop.wait(0.05)  # short polls (tests) must not spin
            except Exception:
                log.exception("notifier poll failed")
                self._stop.wait(1)

    def start(self) -> NotifierWorker:
        self._thread = threading.Thread(target=self._run, name="approval-notifier", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
