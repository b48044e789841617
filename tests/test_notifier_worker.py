"""The local SQS event source of the notifier: Lambda's event shape, partial batch failures, and
the mailbox reader's link extraction."""

from __future__ import annotations

from typing import Any

from proctor.dev.mailbox import links_in, parse_messages
from proctor.dev.notifier_worker import NotifierWorker


class FakeSqs:
    def __init__(self, bodies: list[str]) -> None:
        self.messages = [{"MessageId": f"m{i}", "ReceiptHandle": f"r{i}", "Body": b, "Attributes": {}}
                         for i, b in enumerate(bodies)]
        self.deleted: list[str] = []

    def get_queue_attributes(self, **_: Any) -> dict[str, Any]:
        return {"Attributes": {"QueueArn": "arn:aws:sqs:us-east-1:123456789012:q"}}

    def receive_message(self, **_: Any) -> dict[str, Any]:
        batch, self.messages = self.messages, []
        return {"Messages": batch}

    def delete_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, str]]) -> None:
        self.deleted += [e["ReceiptHandle"] for e in Entries]


def test_failed_batch_items_stay_on_the_queue_and_the_rest_are_deleted() -> None:
    seen: list[dict[str, Any]] = []

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        seen.append(event)
        return {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in event["Records"]
                                      if r["body"] == "bad"]}

    sqs = FakeSqs(["good", "bad", "good"])
    worker = NotifierWorker(sqs, "https://q", handler, region="us-east-1", wait_seconds=0)
    assert worker.poll_once() == 3
    assert sqs.deleted == ["r0", "r2"]
    record = seen[0]["Records"][0]
    assert record["eventSource"] == "aws:sqs" and record["eventSourceARN"].endswith(":q")
    assert record["body"] == "good" and len(record["md5OfBody"]) == 32 and record["awsRegion"] == "us-east-1"
    assert worker.poll_once() == 0


def test_a_crashing_handler_deletes_nothing() -> None:
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    sqs = FakeSqs(["x"])
    assert NotifierWorker(sqs, "https://q", handler, region="us-east-1").poll_once() == 1
    assert sqs.deleted == []


def test_mailbox_links_come_from_text_and_html_bodies() -> None:
    url = "http://127.0.0.1:1/v1/approvals/apx/review?approver=a%40b.c&exp=1&sig=s-_"
    html = f'<p><a href="{url.replace("&", "&amp;")}">{url.replace("&", "&amp;")}</a></p>'
    assert links_in(html) == (url,)
    assert links_in(f"see\n{url}\n") == (url,)
    (mail,) = parse_messages([{"id": "1", "source": "p@x.y", "destinations": {"ToAddresses": ["a@b.c"]},
                               "subject": "s", "body": html}])
    assert mail.to == ("a@b.c",) and mail.links == (url,)
