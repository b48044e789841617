"""`make demo` runs `proctor demo`: the story must run end to end and say what it shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCTOR_", "PG", "AWS_"))}
    out = subprocess.run([sys.executable, "-m", "proctor.cli", "--state-dir", str(tmp_path), "demo"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "HTTP 401: invalid token: signature invalid" in text
    assert "app_rw       |         6" in text
    assert ("| acme/app | 42  | bob          | app_rw       | query    | "
            "INSERT INTO orders (customer_id, amount, status) VALUES (1, 99.50, 'deployed');") in text
    assert "statement held for approval ap" in text and "to ann.approver@example.com" in text
    assert "\n   DELETE 1\n" in text
    assert "| query    | DELETE FROM orders WHERE status = 'deployed';" in text
    assert "| approved  |" in text
    assert 'ERROR:  statement blocked by Proctor rule "no-ddl"' in text
    assert "| block    | DROP TABLE customers;" in text
    assert "| 4111111111111111 | 078-05-1120 | ADA@EXAMPLE.COM" in text  # directly: clear
    assert "| *************01 | ************1111 | *** | ***" in text  # through the gateway: masked
    assert "| pii-email    | public.customers.email       | hash    |      3 |" in text
    assert "hash chain verified" in text
    assert not (tmp_path / "state.json").exists()
