"""Values one stack hands another, as named stack outputs read with `Fn::GetStackOutput`.

Explicit rather than CDK's automatic references: the consumer's template then holds the same
expression at synth time as at construction time (so cdk-nag finding ids can be computed), and it
works across regions, which a regional gateway stack needs.
"""

from __future__ import annotations

from aws_cdk import CfnOutput, Fn, Stack


def share(value: str, *, producer: Stack, name: str, consumer: Stack, description: str) -> str:
    if producer.node.try_find_child(name) is None:
        CfnOutput(producer, name, value=value, description=description)
    if consumer is not producer:
        consumer.add_stack_dependency(producer, f"reads the {name} output")
    return Fn.get_stack_output(producer.stack_name, name, producer.region)
