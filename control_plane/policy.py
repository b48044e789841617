"""Policy evaluation: which policy (if any) lets an identity reach a target."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

from control_plane.contract import Identity


def _matches_any(value: str | None, patterns: Iterable[str]) -> bool:
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


def subject_matches(matcher: Mapping[str, Any], identity: Identity) -> bool:
    if matcher.get("issuer") and matcher["issuer"] != identity.issuer:
        return False
    if matcher.get("subjects") and not _matches_any(identity.subject, matcher["subjects"]):
        return False
    if matcher.get("groups") and not set(matcher["groups"]) & set(identity.groups):
        return False
    for claim, expected in (matcher.get("claims") or {}).items():
        patterns = [expected] if isinstance(expected, str) else list(expected)
        if not _matches_any(identity.pipeline.get(claim), patterns):
            return False
    # An empty matcher would admit everyone of every issuer: refuse to read it that way.
    return any(matcher.get(k) for k in ("subjects", "groups", "claims"))


def policy_applies(policy: Mapping[str, Any], identity: Identity, target: str) -> bool:
    if not any(fnmatchcase(target, pattern) for pattern in policy.get("targets", [])):
        return False
    return any(subject_matches(m, identity) for m in policy.get("subjects", []))


def select_policy(policies: Iterable[Mapping[str, Any]], identity: Identity,
                  target: str) -> Mapping[str, Any] | None:
    """The policy a grant is issued under: of those that apply, one that needs no access approval
    wins over one that does; ties go to the policy name, so the choice is deterministic."""
    applicable = [p for p in policies if policy_applies(p, identity, target)]
    if not applicable:
        return None
    return min(applicable, key=lambda p: (bool(p.get("require_access_approval")), p["name"]))


def is_member(identity: Identity, groups: Iterable[str]) -> bool:
    return bool(set(groups) & set(identity.groups))
