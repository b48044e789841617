"""DynamoDB persistence: configuration (targets, policies, issuers) and request state (grants,
revocations, access requests). Items keep their document as JSON in `doc` so the table needs no
schema beyond the `pk`/`sk` keys and no Decimal juggling."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError

from control_plane.errors import Conflict, NotFound

TARGETS = "TARGETS"
POLICIES = "POLICIES"
ISSUERS = "ISSUERS"
REVOKED = "REVOKED"


def _policy_versions_pk(name: str) -> str:
    return f"POLICY#{name}"


def _version_sk(version: int) -> str:
    return f"V#{version:010d}"


class Table:
    """The four operations Proctor needs, over a boto3 DynamoDB client."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name

    def put(self, pk: str, sk: str, doc: dict[str, Any], *, expires_at: int | None = None,
            condition: str | None = None) -> None:
        item: dict[str, Any] = {"pk": {"S": pk}, "sk": {"S": sk}, "doc": {"S": json.dumps(doc)}}
        if expires_at is not None:
            item["expires_at"] = {"N": str(int(expires_at))}
        kwargs: dict[str, Any] = {"TableName": self.name, "Item": item}
        if condition:
            kwargs["ConditionExpression"] = condition
        try:
            self.client.put_item(**kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise Conflict(f"{pk}/{sk} changed concurrently or already exists") from exc
            raise

    def get(self, pk: str, sk: str) -> dict[str, Any] | None:
        item = self.client.get_item(TableName=self.name, Key={"pk": {"S": pk}, "sk": {"S": sk}},
                                    ConsistentRead=True).get("Item")
        return json.loads(item["doc"]["S"]) if item else None

    def delete(self, pk: str, sk: str) -> bool:
        out = self.client.delete_item(TableName=self.name, Key={"pk": {"S": pk}, "sk": {"S": sk}},
                                      ReturnValues="ALL_OLD")
        return "Attributes" in out

    def query(self, pk: str, *, after: str | None = None, descending: bool = False,
              limit: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        kwargs: dict[str, Any] = {
            "TableName": self.name,
            "KeyConditionExpression": "pk = :pk" + (" AND sk > :after" if after else ""),
            "ExpressionAttributeValues": {":pk": {"S": pk}} | ({":after": {"S": after}} if after else {}),
            "ScanIndexForward": not descending,
            "ConsistentRead": True,
        }
        if limit:
            kwargs["Limit"] = limit
        while True:
            page = self.client.query(**kwargs)
            for item in page.get("Items", []):
                yield item["sk"]["S"], json.loads(item["doc"]["S"])
            if limit or "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


class ConfigStore:
    """Targets, versioned policies and OIDC issuers."""

    def __init__(self, table: Table) -> None:
        self.table = table

    # targets ---------------------------------------------------------------------------------
    def put_target(self, target: dict[str, Any]) -> None:
        self.table.put(TARGETS, target["name"], target)

    def get_target(self, name: str) -> dict[str, Any]:
        target = self.table.get(TARGETS, name)
        if target is None:
            raise NotFound(f"target {name!r} not found")
        return target

    def list_targets(self) -> list[dict[str, Any]]:
        return [doc for _, doc in self.table.query(TARGETS)]

    def delete_target(self, name: str) -> None:
        if not self.table.delete(TARGETS, name):
            raise NotFound(f"target {name!r} not found")

    # policies (every change is a new version; grants name the version) -----------------------
    def put_policy(self, policy: dict[str, Any], *, author: str, now: float | None = None) -> int:
        name = policy["name"]
        current = self.table.get(POLICIES, name)
        version = (current["version"] + 1) if current else 1
        doc = dict(policy, version=version, updated_by=author, updated_at=int(now or time.time()))
        self.table.put(_policy_versions_pk(name), _version_sk(version), doc,
                       condition="attribute_not_exists(pk)")
        self.table.put(POLICIES, name, doc)
        return version

    def get_policy(self, name: str, version: int | None = None) -> dict[str, Any]:
        if version is None:
            doc = self.table.get(POLICIES, name)
        else:
            doc = self.table.get(_policy_versions_pk(name), _version_sk(version))
        if doc is None:
            raise NotFound(f"policy {name!r}" + (f" version {version}" if version else "") + " not found")
        return doc

    def list_policies(self) -> list[dict[str, Any]]:
        return [doc for _, doc in self.table.query(POLICIES)]

    def policy_versions(self, name: str) -> list[dict[str, Any]]:
        return [doc for _, doc in self.table.query(_policy_versions_pk(name))]

    def delete_policy(self, name: str) -> None:
        # Versions stay: evidence keeps naming them.
        if not self.table.delete(POLICIES, name):
            raise NotFound(f"policy {name!r} not found")

    # issuers ---------------------------------------------------------------------------------
    def put_issuer(self, issuer: dict[str, Any]) -> None:
        self.table.put(ISSUERS, issuer["issuer"], issuer)

    def get_issuer(self, issuer: str) -> dict[str, Any] | None:
        return self.table.get(ISSUERS, issuer)

    def list_issuers(self) -> list[dict[str, Any]]:
        return [doc for _, doc in self.table.query(ISSUERS)]

    def delete_issuer(self, issuer: str) -> None:
        if not self.table.delete(ISSUERS, issuer):
            raise NotFound(f"issuer {issuer!r} not found")


class StateStore:
    """Issued grants, revocations and access requests (items expire through the TTL attribute)."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def record_grant(self, grant: dict[str, Any], *, expires_at: int) -> None:
        self.table.put(f"GRANT#{grant['grant_id']}", "META", grant, expires_at=expires_at + 86400)

    def get_grant(self, grant_id: str) -> dict[str, Any]:
        doc = self.table.get(f"GRANT#{grant_id}", "META")
        if doc is None:
            raise NotFound(f"grant {grant_id!r} not found")
        return doc

    def revoke_grant(self, grant_id: str, *, by: str, reason: str, now: float | None = None) -> dict[str, Any]:
        grant = self.get_grant(grant_id)
        ts = now or time.time()
        if grant.get("revoked_at"):
            return grant
        grant.update(revoked_at=ts, revoked_by=by, revoke_reason=reason)
        expires = int(grant["expires_at"])
        self.table.put(f"GRANT#{grant_id}", "META", grant, expires_at=expires + 86400)
        self.table.put(REVOKED, f"{ts:017.6f}#{grant_id}",
                       {"grant_id": grant_id, "revoked_at": ts, "expires_at": expires},
                       expires_at=expires + 86400)
        return grant

    def is_revoked(self, grant_id: str) -> bool:
        doc = self.table.get(f"GRANT#{grant_id}", "META")
        return bool(doc and doc.get("revoked_at"))

    def revocations_since(self, since: float) -> list[dict[str, Any]]:
        # Ties at `since` come back again: callers treat revocations idempotently.
        return [doc for _, doc in self.table.query(REVOKED, after=f"{since:017.6f}")]

    def put_access_request(self, request: dict[str, Any], *, expires_at: int) -> None:
        self.table.put(f"ACCESS#{request['id']}", "META", request, expires_at=expires_at)

    def get_access_request(self, request_id: str) -> dict[str, Any]:
        doc = self.table.get(f"ACCESS#{request_id}", "META")
        if doc is None:
            raise NotFound(f"access request {request_id!r} not found")
        return doc
