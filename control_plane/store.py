"""DynamoDB persistence: configuration (targets, policies, issuers, approver directory) and request
state (grants, revocations, access requests, approvals). Items keep their document as JSON in
`doc` so the table needs no schema beyond the `pk`/`sk` keys and no Decimal juggling."""

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
APPROVER_GROUPS = "APPROVER_GROUPS"
REVOKED = "REVOKED"
# Approvals are listed from one index partition per creation day; pending ones are at most 7 days old.
APPROVAL_INDEX_DAYS = 8


def _policy_versions_pk(name: str) -> str:
    return f"POLICY#{name}"


def _version_sk(version: int) -> str:
    return f"V#{version:010d}"


class Table:
    """The operations Proctor needs, over a boto3 DynamoDB client."""

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
        return self.take(pk, sk) is not None

    def take(self, pk: str, sk: str) -> dict[str, Any] | None:
        """Delete an item and return its document (None if there was none): atomic, so of two
        callers only one gets it."""
        out = self.client.delete_item(TableName=self.name, Key={"pk": {"S": pk}, "sk": {"S": sk}},
                                      ReturnValues="ALL_OLD")
        attributes = out.get("Attributes")
        return json.loads(attributes["doc"]["S"]) if attributes else None

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

    # approver directory: IdP groups name approvers, emails need addresses ----------------------
    def put_approver_group(self, group: dict[str, Any]) -> None:
        self.table.put(APPROVER_GROUPS, group["group"], group)

    def get_approver_group(self, group: str) -> dict[str, Any] | None:
        return self.table.get(APPROVER_GROUPS, group)

    def list_approver_groups(self) -> list[dict[str, Any]]:
        return [doc for _, doc in self.table.query(APPROVER_GROUPS)]


class StateStore:
    """Issued grants, revocations, access requests and approvals (items expire through the TTL attribute)."""

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

    def claim_access_grant(self, request_id: str, marker: dict[str, Any], *, expires_at: int) -> None:
        """Once per access request: a second claim is a Conflict."""
        self.table.put(f"ACCESS#{request_id}", "GRANT", marker, expires_at=expires_at,
                       condition="attribute_not_exists(pk)")

    def record_access_grant(self, request_id: str, marker: dict[str, Any], *, expires_at: int) -> None:
        self.table.put(f"ACCESS#{request_id}", "GRANT", marker, expires_at=expires_at)

    def release_access_grant(self, request_id: str) -> None:
        self.table.delete(f"ACCESS#{request_id}", "GRANT")

    def access_grant(self, request_id: str) -> dict[str, Any] | None:
        return self.table.get(f"ACCESS#{request_id}", "GRANT")

    # approvals: every item of one approval shares its partition -------------------------------
    def put_approval(self, approval: dict[str, Any], *, expires_at: int, create: bool = True) -> None:
        pk = _approval_pk(approval["approval_id"])
        self.table.put(pk, "META", approval, expires_at=expires_at,
                       condition="attribute_not_exists(pk)" if create else None)
        if create:
            day = time.strftime("%Y-%m-%d", time.gmtime(approval["created_at"]))
            self.table.put(f"APPROVALS#{day}", f"{int(approval['created_at']):010d}#{approval['approval_id']}",
                           {"approval_id": approval["approval_id"], "kind": approval["kind"]}, expires_at=expires_at)

    def approval_items(self, approval_id: str) -> dict[str, dict[str, Any]]:
        """sk → document of the items of an approval (META, DECISION#…, FINAL, WORKFLOW#…)."""
        # The task token stays out of everything that could be shown: only `task_token` reads it.
        items = {sk: doc for sk, doc in self.table.query(_approval_pk(approval_id)) if sk != "TOKEN"}
        if "META" not in items:
            raise NotFound(f"approval {approval_id!r} not found")
        return items

    def recent_approval_ids(self, now: float, days: int = APPROVAL_INDEX_DAYS) -> list[str]:
        ids = []
        for back in range(days):
            day = time.strftime("%Y-%m-%d", time.gmtime(now - back * 86400))
            ids += [doc["approval_id"] for _, doc in self.table.query(f"APPROVALS#{day}", descending=True)]
        return ids

    def put_decision(self, approval_id: str, approver_key: str, decision: dict[str, Any], *, expires_at: int) -> None:
        """One decision per approver: a second one is a Conflict."""
        self.table.put(_approval_pk(approval_id), f"DECISION#{approver_key}", decision, expires_at=expires_at,
                       condition="attribute_not_exists(pk)")

    def put_final(self, approval_id: str, final: dict[str, Any], *, expires_at: int, overwrite: bool = False) -> None:
        """The one outcome of an approval; unless `overwrite`, the first writer wins (else Conflict)."""
        self.table.put(_approval_pk(approval_id), "FINAL", final, expires_at=expires_at,
                       condition=None if overwrite else "attribute_not_exists(pk)")

    def put_task_token(self, approval_id: str, token: dict[str, Any], *, expires_at: int) -> None:
        self.table.put(_approval_pk(approval_id), "TOKEN", token, expires_at=expires_at)

    def task_token(self, approval_id: str) -> str | None:
        doc = self.table.get(_approval_pk(approval_id), "TOKEN")
        return str(doc["task_token"]) if doc else None

    def put_link_nonce(self, nonce: str, doc: dict[str, Any], *, expires_at: int) -> None:
        self.table.put(f"LINKNONCE#{nonce}", "META", doc, expires_at=expires_at, condition="attribute_not_exists(pk)")

    def consume_link_nonce(self, nonce: str) -> dict[str, Any] | None:
        """The nonce's document, deleted in the same call: a second consumer gets None."""
        return self.table.take(f"LINKNONCE#{nonce}", "META")


def _approval_pk(approval_id: str) -> str:
    return f"APPROVAL#{approval_id}"
