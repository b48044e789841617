"""Approvals on the real local stack (`proctor dev up`): moto's server runs the state machine, the
supervisor's notifier worker emails approvers through moto's SES, people decide with the CLI or by
clicking the emailed link in headless Chromium, and `proctor grant --wait` picks up the grant."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import Credentials

from control_plane.contract import GrantKeySet, verify_grant
from data_plane.core.control_plane_client import ControlPlaneClient
from proctor.api_client import ApiClient
from proctor.dev.mailbox import Email, read_mailbox

pytestmark = pytest.mark.integration

ANN = "ann.approver@example.com"
BOB = "bob.approver@example.com"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent


def proctor(state_dir: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "proctor.cli", "--state-dir", str(state_dir), *args],
                         capture_output=True, text=True, env=_env(env), timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"proctor {' '.join(args)} exited {out.returncode}: {out.stderr}")
    return out


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCTOR_", "AWS_"))}
    return env | (extra or {})


class LocalStack:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state: dict[str, Any] = json.loads((directory / "state.json").read_text())

    def token(self, sub: str, *groups: str, claims: tuple[str, ...] = ()) -> str:
        args = ["dev", "token", "--sub", sub]
        if groups:
            args += ["--groups", ",".join(groups)]
        for claim in claims:
            args += ["--claim", claim]
        return proctor(self.directory, *args).stdout.strip()

    def api(self, token: str) -> ApiClient:
        return ApiClient(self.state["api_url"], token)

    def gateway(self) -> ControlPlaneClient:
        key = self.state["gateway_iam"]
        return ControlPlaneClient(self.state["api_url"], region=self.state["region"],
                                  credentials=Credentials(key["access_key"], key["secret_key"]))

    def hold_statement(self, statement: str = "DELETE FROM orders WHERE id = 3") -> str:
        pipeline = self.token("repo:acme/app:ref:refs/heads/main",
                              claims=("repository=acme/app", "run_id=77", "actor=bob"))
        grant = self.api(pipeline).post("/v1/grants", {"target": "demo-pg", "reason": "release"})[1]
        held = self.gateway().request("POST", "/v1/gateway/approvals", {
            "grant": grant["token"], "session_id": "sess-chromium", "statement": statement,
            "rule": "hold-deletes", "reason": "release 1.4"})
        return str(held["approval_id"])

    def mail_to(self, to: str, approval_id: str, timeout: float = 20.0) -> Email:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in read_mailbox(self.state["aws_endpoint"]) if to in m.to and approval_id in m.subject]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no email to {to} about {approval_id}")
            time.sleep(0.2)

    def gateway_status(self, approval_id: str, until: str | None = None, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view = self.gateway().request("GET", f"/v1/gateway/approvals/{approval_id}")
            if until is None or view["status"] == until or time.monotonic() > deadline:
                return view
            time.sleep(0.2)

    def execution_status(self, approval_id: str, timeout: float = 20.0) -> str:
        import boto3

        sfn = boto3.client("stepfunctions", endpoint_url=self.state["aws_endpoint"], region_name=self.state["region"],
                           aws_access_key_id="local", aws_secret_access_key="local")
        arn = self.state["approval_state_machine_arn"].replace(":stateMachine:", ":execution:") + f":{approval_id}"
        deadline = time.monotonic() + timeout
        while True:
            status = sfn.describe_execution(executionArn=arn)["status"]
            if status != "RUNNING" or time.monotonic() > deadline:
                return str(status)
            time.sleep(0.2)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("approvals-dev")
    started = time.monotonic()
    proctor(directory, "dev", "up", "--no-gateway")
    stack = LocalStack(directory)
    stack.startup_seconds = time.monotonic() - started  # type: ignore[attr-defined]
    try:
        yield stack
    finally:
        proctor(directory, "dev", "down", check=False)


def test_state_names_what_the_approval_cli_needs(local: LocalStack) -> None:
    assert local.state["public_base_url"] == local.state["api_url"]
    assert local.state["approval_state_machine_arn"].endswith(":stateMachine:proctor-approval")
    assert local.state["notifier_queue_url"].endswith("/proctor-approval-notifier")


def test_jit_grant_waits_for_the_cli_approval_and_carries_the_approval_id(local: LocalStack) -> None:
    admin = local.token("root@example.com", "admins")
    policy = {"name": "contractors-jit", "subjects": [{"groups": ["contractors"]}], "targets": ["demo-pg"],
              "backend_role": "app_ro", "max_session_seconds": 600, "require_access_approval": True,
              "approval": {"approver_groups": ["approvers"], "approvals_required": 2, "timeout_seconds": 600}}
    assert local.api(admin).post("/v1/policies", policy)[0] == 201
    carl = local.token("carl@example.com", "contractors")
    waiting = subprocess.Popen(
        [sys.executable, "-m", "proctor.cli", "--state-dir", str(local.directory), "grant", "--target", "demo-pg",
         "--reason", "incident 9", "--wait", "--timeout", "120", "--format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env({"PROCTOR_TOKEN": carl}))
    try:
        ann = local.token(ANN, "approvers")
        deadline = time.monotonic() + 30
        while True:
            listed = json.loads(proctor(local.directory, "approvals", "list", "--format", "json",
                                        env={"PROCTOR_TOKEN": ann}).stdout)
            mine = [a for a in listed if a["kind"] == "access" and a["reason"] == "incident 9"]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        (approval,) = mine
        table = proctor(local.directory, "approvals", "list", env={"PROCTOR_TOKEN": ann}).stdout
        assert approval["approval_id"] in table and "carl@example.com" in table and "0/2" in table

        out = proctor(local.directory, "approvals", "approve", approval["approval_id"], "--comment", "first",
                      env={"PROCTOR_TOKEN": ann}).stdout
        assert "it is now pending (1 of 2 approvals)" in out
        again = proctor(local.directory, "approvals", "approve", approval["approval_id"],
                        env={"PROCTOR_TOKEN": ann}, check=False)
        assert again.returncode == 1 and "(409)" in again.stderr
        out = proctor(local.directory, "approvals", "approve", approval["approval_id"], "--comment", "second",
                      env={"PROCTOR_TOKEN": local.token(BOB, "approvers")}).stdout
        assert "it is now approved" in out

        stdout, stderr = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, stderr
    grant = json.loads(stdout)
    assert grant["claims"]["apr"] == [approval["approval_id"]]
    assert grant["claims"]["exp"] - grant["claims"]["iat"] == 600
    keys = GrantKeySet(ApiClient(local.state["api_url"]).get("/v1/grant-keys"))
    assert verify_grant(grant["token"], keys).approvals == (approval["approval_id"],)
    assert f"approved by {BOB}" in stderr
    assert local.execution_status(approval["approval_id"]) == "SUCCEEDED"


def test_cli_denial_reaches_the_gateway_and_the_mailbox_lists_the_links(local: LocalStack) -> None:
    approval_id = local.hold_statement()
    local.mail_to(ANN, approval_id)
    listed = json.loads(proctor(local.directory, "dev", "mailbox", "--format", "json").stdout)
    about = [m for m in listed if approval_id in m["subject"]]
    assert {m["to"][0] for m in about} == {ANN, BOB}
    for mail in about:
        (link,) = mail["links"]
        assert link.startswith(f"{local.state['public_base_url']}/v1/approvals/{approval_id}/review?approver=")
    text = proctor(local.directory, "dev", "mailbox", "--to", BOB).stdout
    assert f"subject: Approval needed: demo-pg ({approval_id})" in text and "  link: http://127.0.0.1:" in text
    assert ANN not in text

    out = proctor(local.directory, "approvals", "deny", approval_id, "--comment", "not in prod hours",
                  env={"PROCTOR_TOKEN": local.token(BOB, "approvers")}).stdout
    assert "it is now denied" in out
    view = local.gateway_status(approval_id)
    assert (view["status"], view["decided_by"], view["comment"]) == ("denied", BOB, "not in prod hours")
    assert local.execution_status(approval_id) == "SUCCEEDED"
    refused = proctor(local.directory, "approvals", "approve", approval_id,
                      env={"PROCTOR_TOKEN": local.token(ANN, "approvers")}, check=False)
    assert refused.returncode == 1 and "(409)" in refused.stderr


@pytest.fixture(scope="module")
def chromium() -> str:
    if not shutil.which("chromium"):
        # CI gets it from `make test` (scripts/install-system-deps.sh); try the same here.
        subprocess.run(["bash", str(REPO / "scripts" / "install-system-deps.sh"), "chromium"], check=False,
                       capture_output=True, timeout=900)
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed and could not be installed (apt-get install chromium)")
    return CHROMIUM


def test_email_link_approval_in_headless_chromium(local: LocalStack, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    approval_id = local.hold_statement("DELETE FROM orders WHERE status = 'cancelled' AND note = '<b>x</b>'")
    mail = local.mail_to(ANN, approval_id)
    (link,) = mail.links
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            response = page.goto(link)
            assert response is not None and response.status == 200
            assert page.title() == "Approval requested · Proctor"
            body = page.inner_text("body")
            assert "acme/app" in body and "77" in body and "hold-deletes" in body
            assert "note = '<b>x</b>'" in page.inner_text("pre")  # shown as text, not markup
            page.fill("textarea[name=comment]", "reviewed in the browser")
            with page.expect_navigation():
                page.click("button[value=approve]")
            assert page.inner_text("h1") == "You approved this request"
            # The link again: decided, so no form any more.
            again = page.goto(link)
            assert again is not None and again.status == 409
            assert page.inner_text("h1") == "This approval is approved" and page.query_selector("form") is None
        finally:
            browser.close()
    view = local.gateway_status(approval_id, until="approved")
    assert view["status"] == "approved" and view["decided_by"] == ANN
    assert view["decisions"] == [{"approver": ANN, "decision": "approve", "comment": "reviewed in the browser",
                                  "at": view["decisions"][0]["at"], "via": "email-link"}]
    assert local.execution_status(approval_id) == "SUCCEEDED"


def test_the_stack_still_starts_quickly(local: LocalStack) -> None:
    assert local.startup_seconds < 60  # type: ignore[attr-defined]
