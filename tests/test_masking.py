"""Detectors find regulated values (and pass their look-alikes), methods mask them."""

from __future__ import annotations

import timeit

import pytest

from data_plane.core.masking import (
    BUILTIN_DETECTORS,
    Masking,
    MaskMethod,
    custom_detector,
    iban_valid,
    luhn_valid,
)


def found(detector: str, text: str) -> list[str]:
    return [text[s:e] for s, e in BUILTIN_DETECTORS[detector].find(text)]


@pytest.mark.parametrize(("detector", "text", "expected"), [
    ("email", "contact ada@example.com today", ["ada@example.com"]),
    ("email", "a.b+tag@sub.example.co.uk", ["a.b+tag@sub.example.co.uk"]),
    ("email", "no at sign here", []),
    ("card_number", "card 4111 1111 1111 1111 on file", ["4111 1111 1111 1111"]),
    ("card_number", "5555-5555-5555-4444", ["5555-5555-5555-4444"]),
    ("card_number", "378282246310005", ["378282246310005"]),
    ("card_number", "order 4111111111111112 (fails Luhn)", []),
    ("card_number", "id 1234567890", []),
    ("us_ssn", "ssn 078-05-1120", ["078-05-1120"]),
    ("us_ssn", "000-12-3456 and 666-12-3456 and 912-12-3456", []),
    ("phone", "call +1-202-555-0101 now", ["+1-202-555-0101"]),
    ("phone", "+31 20 555 0104", ["+31 20 555 0104"]),
    ("iban", "pay GB82 WEST 1234 5698 7654 32 now", ["GB82 WEST 1234 5698 7654 32"]),
    ("iban", "DE89370400440532013000", ["DE89370400440532013000"]),
    ("iban", "GB82 WEST 1234 5698 7654 33", []),
    ("aws_access_key", "key AKIAIOSFODNN7EXAMPLE in config", ["AKIAIOSFODNN7EXAMPLE"]),
    ("jwt", "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXZhbHVl ok",
     ["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXZhbHVl"]),
    ("private_key", "x -----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY----- y",
     ["-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"]),
])
def test_detectors(detector: str, text: str, expected: list[str]) -> None:
    assert found(detector, text) == expected


def test_validators() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82WEST12345698765432") and not iban_valid("GB82WEST12345698765433")


@pytest.mark.parametrize(("method", "value", "masked"), [
    (MaskMethod("redact"), "ada@example.com", "***"),
    (MaskMethod("partial", keep_last=4), "4111111111111111", "************1111"),
    (MaskMethod("partial", keep_last=4), "abc", "**c"),
    (MaskMethod("null"), "anything", None),
])
def test_methods(method: MaskMethod, value: str, masked: str | None) -> None:
    assert method.apply(value) == masked


def test_keyed_hash_is_stable_per_key_so_joins_still_work() -> None:
    tenant_a, tenant_b = MaskMethod("hash", hash_key=b"a"), MaskMethod("hash", hash_key=b"b")
    assert tenant_a.apply("ada@example.com") == tenant_a.apply("ada@example.com")
    assert tenant_a.apply("ada@example.com") != tenant_a.apply("alan@example.com")
    assert tenant_a.apply("ada@example.com") != tenant_b.apply("ada@example.com")


def test_column_rules_match_qualified_globs() -> None:
    masking = Masking.from_docs([
        {"name": "emails", "columns": ["*.customers.email"], "method": "partial", "keep_last": 4},
        {"name": "ssn", "columns": ["*.*.ssn"], "method": "null"},
    ])
    assert masking.column_rule("public.customers.email").name == "emails"
    assert masking.column_rule("billing.people.ssn").name == "ssn"
    assert masking.column_rule("public.customers.name") is None


def test_content_scan_masks_only_the_detected_parts() -> None:
    masking = Masking.from_docs([{"name": "pii-in-text", "detectors": ["email", "card_number"], "method": "redact"}])
    text, hits = masking.scan("Ada <ada@example.com> paid with 4111 1111 1111 1111.")
    assert text == "Ada <***> paid with ***."
    assert hits == [("pii-in-text", "email"), ("pii-in-text", "card_number")]
    assert masking.scan("nothing regulated here") == ("nothing regulated here", [])


def test_custom_detector_with_a_validator() -> None:
    employee = custom_detector("employee_id", r"\bE[0-9]{6}\b", lambda v: v != "E000000")
    masking = Masking.from_docs([{"name": "staff", "detectors": ["employee_id"]}], custom={"employee_id": employee})
    assert masking.scan("E123456 and E000000")[0] == "*** and E000000"


def test_unknown_detector_or_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown detectors"):
        Masking.from_docs([{"name": "x", "detectors": ["horoscope"]}])
    with pytest.raises(ValueError, match="unknown method"):
        Masking.from_docs([{"name": "x", "columns": ["*"], "method": "rot13"}])


def test_scanning_a_typical_value_costs_microseconds() -> None:
    masking = Masking.from_docs([{"name": "pii", "detectors": list(BUILTIN_DETECTORS)}])
    per_value = min(timeit.repeat(lambda: masking.scan("Grace Hopper, Arlington VA"), number=2000, repeat=3)) / 2000
    assert per_value < 100e-6  # generous for a shared CI machine; measured ~10 µs here
