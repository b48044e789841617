"""cdk-nag 3 wiring: the AwsSolutions pack runs as a CDK validation plugin on every synth.

A finding is either fixed or acknowledged on the construct it concerns, with a concrete reason.
IAM wildcard findings are acknowledged one by one (`AwsSolutions-IAM5[Resource::...]`), so the
finding ids are computed here from the statement exactly as cdk-nag flattens them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from aws_cdk import Acknowledgment, App, Stack, Validations
from aws_cdk import aws_iam as iam
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct


def check_compliance(app: App) -> None:
    """Fail synth on any unacknowledged AwsSolutions finding (errors and warnings alike)."""
    Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))


def acknowledge(scope: IConstruct, rule_id: str, reason: str) -> None:
    if not reason.strip():
        raise ValueError(f"acknowledging {rule_id} needs a reason")
    Validations.of(scope).acknowledge(Acknowledgment(id=rule_id, reason=reason))


def acknowledge_wildcards(scope: IConstruct, statement: iam.PolicyStatement, reason: str) -> None:
    """Acknowledge each wildcard action and resource of `statement` on `scope` (its role or policy).

    Tokens in the statement must resolve the same way at validation time as now: literals, local
    references, or `Stack.export_value` imports — not raw references to another stack.
    """
    for finding in wildcard_findings(Stack.of(scope), statement):
        acknowledge(scope, f"AwsSolutions-IAM5[{finding}]", reason)


def wildcard_findings(stack: Stack, statement: iam.PolicyStatement) -> list[str]:
    document = stack.resolve(statement.to_statement_json())
    findings = [f"Action::{action}" for action in _as_list(document.get("Action")) if "*" in action]
    for resource in _as_list(document.get("Resource")):
        flat = flatten_cfn_reference(resource)
        if "*" in flat:
            findings.append(f"Resource::{flat}")
    return findings


def flatten_cfn_reference(node: Any) -> str:
    """The string cdk-nag prints for an IAM resource (mirrors cdk-nag's `flattenCfnReference`)."""
    if node is None:
        return ""
    if isinstance(node, str):
        return node.replace("${", "<").replace("}", ">")
    if isinstance(node, dict):
        if "Fn::Join" in node:
            delimiter, items = node["Fn::Join"]
            return delimiter.join(flatten_cfn_reference(item) for item in items)
        if "Fn::Sub" in node:
            return flatten_cfn_reference(node["Fn::Sub"])
        if "Fn::GetAtt" in node:
            resource, attribute = node["Fn::GetAtt"]
            return f"<{flatten_cfn_reference(resource)}.{flatten_cfn_reference(attribute)}>"
        if "Fn::ImportValue" in node:
            return flatten_cfn_reference(node["Fn::ImportValue"])
        if "Ref" in node:
            return f"<{flatten_cfn_reference(node['Ref'])}>"
    # cdk-nag falls back to JSON.stringify (e.g. for Fn::GetStackOutput).
    return json.dumps(node, separators=(",", ":"), ensure_ascii=False)


def _as_list(value: str | Iterable[Any] | None) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str | dict) else list(value)
