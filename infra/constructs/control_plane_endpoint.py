"""How a gateway addresses the control-plane API: where it is, and which of its routes are the gateway's."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import ArnFormat, Aws, Stack

# The routes a gateway may call; everything else on the API is for people and pipelines.
GATEWAY_ROUTES: tuple[tuple[str, str], ...] = (("POST", "/v1/credentials"), ("*", "/v1/gateway/*"))


@dataclass(frozen=True)
class ControlPlaneEndpoint:
    rest_api_id: str
    stage_name: str
    region: str
    account: str

    @property
    def url(self) -> str:
        """Base URL without a trailing slash; the gateway appends `/v1/...`."""
        return f"https://{self.rest_api_id}.execute-api.{self.region}.{Aws.URL_SUFFIX}/{self.stage_name}"

    def invoke_arn(self, stack: Stack, method: str, path: str) -> str:
        return stack.format_arn(
            service="execute-api",
            region=self.region,
            account=self.account,
            resource=self.rest_api_id,
            resource_name=f"{self.stage_name}/{method}{path}",
            arn_format=ArnFormat.SLASH_RESOURCE_NAME,
        )

    def gateway_route_arns(self, stack: Stack) -> list[str]:
        return [self.invoke_arn(stack, method, path) for method, path in GATEWAY_ROUTES]
