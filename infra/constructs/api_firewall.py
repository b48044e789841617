"""AWS WAF in front of the control-plane API: managed rule groups and a per-client rate limit."""

from __future__ import annotations

from aws_cdk import aws_wafv2 as wafv2
from constructs import Construct


class ApiFirewall(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, stage_arn: str, requests_per_5_min: int) -> None:
        super().__init__(scope, construct_id)
        rules = [
            _managed_rule(
                "CommonRuleSet",
                "AWSManagedRulesCommonRuleSet",
                priority=0,
                # Policy and target documents can exceed the 8 KB body limit of this group.
                count_only=("SizeRestrictions_BODY",),
            ),
            _managed_rule("KnownBadInputs", "AWSManagedRulesKnownBadInputsRuleSet", priority=1),
            wafv2.CfnWebACL.RuleProperty(
                name="RatePerClientIp",
                priority=2,
                action=wafv2.CfnWebACL.RuleActionProperty(block={}),
                statement=wafv2.CfnWebACL.StatementProperty(
                    rate_based_statement=wafv2.CfnWebACL.RateBasedStatementProperty(
                        aggregate_key_type="IP", limit=requests_per_5_min
                    )
                ),
                visibility_config=_visibility("RatePerClientIp"),
            ),
        ]
        self.web_acl = wafv2.CfnWebACL(
            self,
            "WebAcl",
            scope="REGIONAL",
            default_action=wafv2.CfnWebACL.DefaultActionProperty(allow={}),
            visibility_config=_visibility("ProctorControlPlane"),
            rules=rules,
        )
        wafv2.CfnWebACLAssociation(self, "Association", resource_arn=stage_arn, web_acl_arn=self.web_acl.attr_arn)


def _managed_rule(
    name: str, group: str, *, priority: int, count_only: tuple[str, ...] = ()
) -> wafv2.CfnWebACL.RuleProperty:
    return wafv2.CfnWebACL.RuleProperty(
        name=name,
        priority=priority,
        override_action=wafv2.CfnWebACL.OverrideActionProperty(none={}),
        statement=wafv2.CfnWebACL.StatementProperty(
            managed_rule_group_statement=wafv2.CfnWebACL.ManagedRuleGroupStatementProperty(
                vendor_name="AWS",
                name=group,
                rule_action_overrides=[
                    wafv2.CfnWebACL.RuleActionOverrideProperty(
                        name=rule, action_to_use=wafv2.CfnWebACL.RuleActionProperty(count={})
                    )
                    for rule in count_only
                ]
                or None,
            )
        ),
        visibility_config=_visibility(name),
    )


def _visibility(metric: str) -> wafv2.CfnWebACL.VisibilityConfigProperty:
    return wafv2.CfnWebACL.VisibilityConfigProperty(
        cloud_watch_metrics_enabled=True, metric_name=metric, sampled_requests_enabled=True
    )
