"""The approval confirmation page an email link opens, and the decision its form posts.

Served by the public API function without a bearer token: the link's signature and expiry
authenticate the approver it was issued to (who must still be in the approver directory), and the
form's one-time CSRF token makes the POST a deliberate, single act. Everything shown is escaped;
the page loads nothing and may not be framed.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape
from typing import Any

from control_plane import approvals
from control_plane.approval_links import LinkRefused, ReviewLink, form_token_nonce, new_form_token
from control_plane.errors import BadRequest, Conflict
from control_plane.runtime import Services, current_audit

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b}"
    "dl{display:grid;grid-template-columns:max-content 1fr;gap:.35rem 1rem}dt{font-weight:600}dd{margin:0}"
    "pre{background:#f4f4f4;padding:.75rem;white-space:pre-wrap;word-break:break-word}"
    "textarea{width:100%;min-height:4rem}button{font-size:1rem;padding:.5rem 1.25rem;margin:.75rem .5rem 0 0}"
    ".approve{background:#1a7f37;color:#fff}.deny{background:#cf222e;color:#fff}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
HTML = "text/html; charset=utf-8"
SECURITY_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # The link's signature is in the URL: never hand it on.
    "Referrer-Policy": "no-referrer",
}
MAX_COMMENT = 2000


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)} · Proctor</title><style>{_STYLE}</style></head>"
            f"<body><h1>{escape(title)}</h1>{body}</body></html>\n")


def _when(epoch: Any) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if epoch else "—"


def _facts(rows: list[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in rows if v not in (None, ""))
    return f"<dl>{items}</dl>"


def _summary(approval: approvals.Approval) -> str:
    doc = approval.doc
    requester = approval.requester
    pipeline = requester.pipeline
    asked_by = requester.email or requester.subject
    rows: list[tuple[str, Any]] = [
        ("Asked by", asked_by if not pipeline else f"pipeline {requester.subject}"),
        ("Pipeline", pipeline.get("repository")),
        ("Run", pipeline.get("run_id")),
        ("Triggered by", pipeline.get("actor")),
        ("Workflow", pipeline.get("workflow")),
        ("Ref", pipeline.get("ref")),
        ("Request", "run a statement" if approval.kind == approvals.KIND_STATEMENT else "access (a grant)"),
        ("Target", f"{doc['target']} ({doc.get('target_kind') or '?'}"
                   + (f", database {doc['database']}" if doc.get("database") else "") + ")"),
        ("Backend role", doc.get("backend_role")),
        ("Policy", f"{doc['policy']['name']} v{doc['policy']['version']}"),
        ("Rule", doc.get("rule")),
        ("Reason", doc.get("reason")),
        ("Session", doc.get("session_id")),
        ("Approvals", f"{len([d for d in approval.decisions if d['decision'] == approvals.APPROVE])} of "
                      f"{doc['approvals_required']} needed"),
        ("Expires", _when(doc["expires_at"])),
        ("Approval id", approval.id),
    ]
    statement = (f"<h2>Statement</h2><pre>{escape(doc['statement'])}</pre>" if doc.get("statement") else "")
    return _facts(rows) + statement


def render_review(approval: approvals.Approval, approver: approvals.Approver, form_token: str) -> str:
    decided = "".join(f"<li>{escape(d['approver'])}: {escape(d['decision'])}"
                      + (f" — {escape(d['comment'])}" if d.get("comment") else "") + "</li>"
                      for d in approval.decisions)
    form = (
        '<form method="post">'
        f'<input type="hidden" name="csrf" value="{escape(form_token)}">'
        '<p><label for="comment">Comment (recorded with your decision)</label><br>'
        f'<textarea id="comment" name="comment" maxlength="{MAX_COMMENT}"></textarea></p>'
        '<button class="approve" type="submit" name="decision" value="approve">Approve</button>'
        '<button class="deny" type="submit" name="decision" value="deny">Deny</button>'
        "</form>"
    )
    return _page("Approval requested",
                 f"<p>You are deciding as <strong>{escape(approver.name)}</strong>.</p>"
                 + _summary(approval)
                 + (f"<h2>Decisions so far</h2><ul>{decided}</ul>" if decided else "")
                 + form)


def render_outcome(approval: approvals.Approval, now: float, *, headline: str) -> str:
    status = approval.status(now)
    decided_at, decided_by, comment = approval.closing(now)
    rows = [("Status", status), ("Decided by", decided_by), ("Comment", comment),
            ("Decided at", _when(decided_at) if decided_at else None)]
    return _page(headline, _facts(rows) + _summary(approval))


def render_refusal(title: str, detail: str) -> str:
    return _page(title, f"<p>{escape(detail)}</p>")


def show(svc: Services, approval_id: str, query: Mapping[str, str | None]) -> tuple[int, str]:
    """GET of an emailed link: the confirmation page with a fresh one-time form token."""
    now = svc.clock()
    link = ReviewLink.verify(svc.link_key(), approval_id, query.get("approver"), query.get("exp"),
                             query.get("sig"), now=now)
    approval = approvals.load(svc, approval_id)
    approvals.link_evidence(approval)
    approver = approvals.link_approver(svc, approval, link.approver)
    current_audit().identity = approver.identity()
    current_audit().details["via"] = approvals.VIA_EMAIL_LINK
    if approval.status(now) != approvals.PENDING:
        return 409, render_outcome(approval, now, headline=f"This approval is {approval.status(now)}")
    approvals.ensure_may_decide(approval, approver)
    if approval.decided_by(approver.key):
        return 409, render_outcome(approval, now, headline="You have already decided")
    token, nonce = new_form_token(svc.link_key(), approval_id, link.approver)
    svc.state.put_link_nonce(nonce, {"approval_id": approval_id, "approver": link.approver, "issued_at": int(now)},
                             expires_at=link.expires_at + 86400)
    return 200, render_review(approval, approver, token)


def submit(svc: Services, approval_id: str, query: Mapping[str, str | None],
           form: Mapping[str, str]) -> tuple[int, str]:
    """POST of the confirmation form: link, CSRF token and one-time nonce checked, then decided."""
    now = svc.clock()
    key = svc.link_key()
    link = ReviewLink.verify(key, approval_id, query.get("approver"), query.get("exp"), query.get("sig"), now=now)
    nonce = form_token_nonce(key, form.get("csrf"), approval_id, link.approver)
    stored = svc.state.consume_link_nonce(nonce)
    if stored is None or stored.get("approval_id") != approval_id or stored.get("approver") != link.approver:
        raise LinkRefused("this form was already submitted (or is not from this link): open the link again")
    decision = form.get("decision")
    if decision not in (approvals.APPROVE, approvals.DENY):
        raise BadRequest("choose Approve or Deny")
    comment = (form.get("comment") or "").strip()
    if len(comment) > MAX_COMMENT:
        raise BadRequest(f"the comment is longer than {MAX_COMMENT} characters")
    approval = approvals.load(svc, approval_id)
    approver = approvals.link_approver(svc, approval, link.approver)
    current_audit().identity = approver.identity()
    current_audit().details["via"] = approvals.VIA_EMAIL_LINK
    try:
        approval = approvals.decide(svc, approval_id, approver, decision, comment)
    except Conflict as exc:
        return 409, render_refusal("Nothing was recorded", exc.detail)
    verb = "approved" if decision == approvals.APPROVE else "denied"
    return 200, render_outcome(approval, svc.clock(), headline=f"You {verb} this request")
