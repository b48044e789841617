"""`proctor dev mailbox`: the emails moto's SES accepted, with the approval links in them.

moto keeps sent messages in its SES backend; from another process they are read through moto's
`/moto-api/data.json` (the server of the local stack runs in the supervisor)."""

from __future__ import annotations

import html
import json
import re
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_LINK = re.compile(r"""https?://[^\s"'<>]+/v1/approvals/[^\s"'<>/]+/review\?[^\s"'<>]+""")


@dataclass(frozen=True)
class Email:
    id: str
    sender: str
    to: tuple[str, ...]
    subject: str
    body: str
    links: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "from": self.sender, "to": list(self.to), "subject": self.subject,
                "links": list(self.links), "body": self.body}


def links_in(body: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for match in _LINK.findall(body or ""):
        seen.setdefault(html.unescape(match), None)
    return tuple(seen)


def parse_messages(raw: Iterable[Mapping[str, Any]]) -> list[Email]:
    emails = []
    for message in raw:
        destinations = message.get("destinations") or {}
        to = tuple(a for key in ("ToAddresses", "CcAddresses", "BccAddresses") for a in destinations.get(key) or ())
        body = str(message.get("body") or "")
        emails.append(Email(id=str(message.get("id")), sender=str(message.get("source")), to=to,
                            subject=str(message.get("subject") or ""), body=body, links=links_in(body)))
    return emails


def read_mailbox(aws_endpoint: str, *, timeout: float = 30.0) -> list[Email]:
    with urllib.request.urlopen(f"{aws_endpoint.rstrip('/')}/moto-api/data.json",  # noqa: S310 - local moto
                                timeout=timeout) as response:
        data = json.loads(response.read())
    return parse_messages((data.get("ses") or {}).get("Message") or [])
