"""`cdk synth` / `cdk deploy` entry (see cdk.json): read context, instantiate the stacks, run cdk-nag."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import App, Environment

from infra.compliance import check_compliance
from infra.settings import ProctorSettings
from infra.stacks.control_plane_stack import ControlPlaneStack
from infra.stacks.evidence_stack import EvidenceStack
from infra.stacks.gateway_stack import GatewayStack


@dataclass(frozen=True)
class ProctorStacks:
    evidence: EvidenceStack
    control_plane: ControlPlaneStack
    gateways: dict[str, GatewayStack]


def build(app: App) -> ProctorStacks:
    settings = ProctorSettings.from_context(app.node)
    home = Environment(account=settings.account, region=settings.region)
    evidence = EvidenceStack(
        app,
        "ProctorEvidence",
        env=home,
        retention_days=settings.evidence_retention_days,
        gateway_regions=settings.gateway_regions,
    )
    control_plane = ControlPlaneStack(app, "ProctorControlPlane", env=home, settings=settings, evidence=evidence)
    gateways = {
        region: GatewayStack(
            app,
            f"ProctorGateway-{region}",
            env=Environment(account=settings.account, region=region),
            settings=settings,
            evidence=evidence,
            control_plane=control_plane,
        )
        for region in settings.gateway_regions
    }
    check_compliance(app)
    return ProctorStacks(evidence=evidence, control_plane=control_plane, gateways=gateways)


def main() -> None:
    app = App()
    build(app)
    app.synth()


if __name__ == "__main__":
    main()
