"""Hostile Kafka record values, each with the rule that must quarantine it.

Hand-built, one per kind of trouble an operator has met or a producer could send: bytes
that are not JSON, JSON that is not a billing event, text Postgres cannot store, numbers
a float would round, sizes past the limits, nesting that exhausts recursion, and events
that are well-formed but break a business rule. Every value is distinct, and every
event that gets as far as the business rules uses customers, plans and FX rates of
`SyntheticBillingStream().reference_data(around=now)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from billing_dagster.contract import format_timestamp
from billing_dagster.rules import DEFAULT_LIMITS, ContractLimits
from billing_dagster.synthetic import GeneratedRecord

#: A customer of the synthetic reference data that the good neighbours never use.
QUIET_CUSTOMER = 6000
_DROP = object()  # a field to leave out of the event


@dataclass(frozen=True)
class Hostile:
    kind: str
    value: bytes | None
    rule: str

    def record(self) -> GeneratedRecord:
        # The key names the kind, so the test finds the record in quarantine by it.
        return GeneratedRecord(f"hostile:{self.kind}".encode(), self.value, "invalid")  # type: ignore[arg-type]


def _event(kind: str, at: datetime, /, **fields: object) -> dict[str, object]:
    event: dict[str, object] = {
        "event_id": f"hostile-{kind}",
        "customer_id": 1001,
        "transaction_type": "PAYMENT",
        "amount": "10.00",
        "currency": "USD",
        "created_at": format_timestamp(at),
    }
    event.update(fields)
    return {k: v for k, v in event.items() if v is not _DROP}


def _json(event: dict[str, object]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def _raw(kind: str, created_at: datetime, tail: str) -> bytes:
    """An event whose last members are written by hand (what json.dumps cannot write);
    the fields the tail names are left out of the rest."""
    named = dict.fromkeys(re.findall(r'"(\w+)"\s*:', tail), _DROP)
    head = _json(_event(kind, created_at, **named))[:-1].decode()
    return f"{head},{tail}}}".encode()


def hostile_corpus(now: datetime, limits: ContractLimits = DEFAULT_LIMITS) -> list[Hostile]:
    """The corpus; events are created a minute before `now` unless the kind is time."""
    at = now - timedelta(minutes=1)

    def event(kind: str, rule: str, **fields: object) -> Hostile:
        return Hostile(kind, _json(_event(kind, at, **fields)), rule)

    def raw(kind: str, rule: str, tail: str) -> Hostile:
        return Hostile(kind, _raw(kind, at, tail), rule)

    good = _json(_event("template", at))
    padding = "x" * limits.max_record_bytes
    corpus = [
        # ---- not a JSON object ----------------------------------------------------------
        Hostile("not_json", b"not json at all", "json"),
        Hostile("top_level_array", b'[{"event_id": "in-an-array"}]', "json_object"),
        Hostile("top_level_number", b"42", "json_object"),
        Hostile("top_level_string", b'"PAYMENT"', "json_object"),
        Hostile("top_level_null", b"null", "json_object"),
        Hostile("tombstone", None, "empty_value"),
        Hostile("empty_value", b"", "empty_value"),
        Hostile("blank_value", b" \n\t ", "empty_value"),
        Hostile("invalid_utf8", b'{"event_id": "caf\xe9", "amount": "1.00"}', "utf8"),
        Hostile("utf8_bom", b"\xef\xbb\xbf" + good.replace(b"template", b"bom"), "json"),
        Hostile("trailing_garbage", good.replace(b"template", b"trailing") + b" xyz", "json"),
        Hostile("two_objects", good.replace(b"template", b"two") + b"{}", "json"),
        Hostile("truncated", good[:50], "json"),
        raw("nan_amount", "json", '"amount":NaN'),
        raw("infinity_amount", "json", '"amount":-Infinity'),
        raw("huge_float_amount", "number:range", '"amount":1e400'),
        raw("raw_control_character", "json", '"amount":"1.00","metadata":"a\x01b"'),
        raw("amount_plus_sign_number", "json", '"amount":+10.00'),
        raw("amount_leading_zero_number", "json", '"amount":010.00'),
        event("amount_object", "field_type", amount={"value": "10.00"}),
        event("amount_array", "field_type", amount=["10.00"]),
        event("metadata_object", "field_type", metadata={"plan": "pro"}),
        # ---- structure: nesting, size, keys ------------------------------------------
        raw(
            "deep_nesting", "limit:nesting", '"amount":"1.00","x":' + "[" * 100_000 + "]" * 100_000
        ),
        raw("unbalanced_nesting", "limit:nesting", '"amount":"1.00","x":' + "{" * 100),
        raw("oversized_record", "limit:record_bytes", f'"amount":"1.00","pad":"{padding}"'),
        raw("duplicate_amount_key", "json:duplicate_key", '"amount":"1.00","amount":"2.00"'),
        raw("duplicate_escaped_key", "json:duplicate_key", '"amount":"1.00","\\u0061mount":"2.00"'),
        raw(
            "duplicate_event_id_key",
            "json:duplicate_key",
            '"amount":"1.00","event_id":"dup-a","event_id":"dup-b"',
        ),
        # ---- text Postgres cannot store ------------------------------------------------
        event("nul_in_event_id", "text:control_character", event_id="hostile-a\u0000b"),
        event("bell_in_transaction_type", "text:control_character", transaction_type="PAYMENT\a"),
        event("escape_in_currency", "text:control_character", currency="US\u001bD"),
        event("nul_in_customer_id_text", "text:control_character", customer_id="1001\u0000"),
        event("nul_in_amount_text", "text:control_character", amount="10.00\u0000"),
        event("nul_in_created_at", "text:control_character", created_at="2026-01-01\u0000"),
        event("nul_in_metadata", "text:control_character", metadata='{"a":"\u0000"}'),
        event("c1_control_in_event_id", "text:control_character", event_id="hostile-\u0085"),
        event("delete_in_metadata", "text:control_character", metadata="note\u007f"),
        raw("lone_high_surrogate", "text:lone_surrogate", '"amount":"1.00","metadata":"a\\ud800b"'),
        raw("lone_low_surrogate", "text:lone_surrogate", '"amount":"1.00","currency":"\\udc00"'),
        raw("reversed_surrogates", "text:lone_surrogate", '"amount":"1.00","m":"\\ude00\\ud83d"'),
        # ---- numbers as written ---------------------------------------------------------
        raw("amount_float_precision", "decimal_12_2:amount", '"amount":10.0000000000000001'),
        raw("amount_float_big", "decimal_12_2:amount", '"amount":1234567890.1200000001'),
        raw("amount_exponent_number", "number:exponent", '"amount":1.5E2'),
        event("amount_exponent_text", "number:exponent", amount="1e3"),
        event("amount_too_many_digits", "decimal_12_2:amount", amount="12345678901.00"),
        event("amount_three_decimals", "decimal_12_2:amount", amount="10.005"),
        event("amount_plus_sign_text", "decimal_12_2:amount", amount="+12.30"),
        event("amount_with_spaces", "decimal_12_2:amount", amount="1 234.56"),
        event("amount_bool", "decimal_12_2:amount", amount=True),
        event("amount_null", "required:amount", amount=None),
        event("amount_missing", "required:amount", amount=_DROP),
        event("amount_empty", "required:amount", amount=""),
        raw("tax_exponent", "number:exponent", '"amount":"10.00","tax_amount":1e1'),
        raw("tax_precision", "decimal_12_2:tax_amount", '"amount":"10.00","tax_amount":0.001'),
        raw("customer_id_exponent", "number:exponent", '"amount":"1.00","customer_id":1e3'),
        raw("customer_id_float", "integer:customer_id", '"amount":"1.00","customer_id":1001.5'),
        raw(
            "customer_id_float_whole", "integer:customer_id", '"amount":"1.00","customer_id":1001.0'
        ),
        event("customer_id_huge", "integer:customer_id", customer_id=99999999999999999999),
        event("customer_id_negative", "integer:customer_id", customer_id=-1001),
        event("customer_id_bool", "integer:customer_id", customer_id=True),
        event("customer_id_text", "integer:customer_id", customer_id="abc"),
        event("customer_id_missing", "required:customer_id", customer_id=_DROP),
        # ---- other contract fields ------------------------------------------------------
        event("event_id_empty", "required:event_id", event_id=""),
        event("event_id_whitespace", "required:event_id", event_id="   "),
        event("event_id_missing", "required:event_id", event_id=_DROP),
        event(
            "event_id_oversized",
            "limit:event_id_length",
            event_id="hostile-" + "e" * limits.max_event_id_length,
        ),
        event(
            "metadata_oversized",
            "limit:metadata_bytes",
            metadata="m" * (limits.max_metadata_bytes + 1),
        ),
        event("unknown_transaction_type", "enum:transaction_type", transaction_type="GIFT"),
        event("transaction_type_missing", "required:transaction_type", transaction_type=_DROP),
        event("lower_case_currency", "format:currency", currency="usd"),
        event("four_letter_currency", "format:currency", currency="USDT"),
        event("timestamp_without_zone", "timestamp:created_at", created_at="2026-11-24T13:05:00"),
        event("timestamp_year_zero", "timestamp:range", created_at="0000-11-24T13:05:00Z"),
        event("timestamp_february_30", "timestamp:created_at", created_at="2026-02-30T13:05:00Z"),
        event("timestamp_words", "timestamp:created_at", created_at="yesterday"),
        event("timestamp_epoch_number", "timestamp:created_at", created_at=1732453500),
        # ---- well-formed, but breaking a business rule ----------------------------------
        event("payment_negative", "sign:payment_positive", amount="-10.00"),
        event("payment_zero", "sign:payment_positive", amount="0.00"),
        event("refund_positive", "sign:return_negative", transaction_type="REFUND"),
        event(
            "adjustment_zero", "sign:adjustment_nonzero", transaction_type="ADJUSTMENT", amount="0"
        ),
        event("unsupported_currency", "currency:supported", currency="XYZ"),
        event("tax_larger_than_amount", "tax:within_amount", tax_amount="20.00"),
        event("tax_opposite_sign", "tax:within_amount", tax_amount="-1.00"),
        event(
            "created_in_the_future",
            "time:future",
            created_at=format_timestamp(now + timedelta(days=1)),
        ),
        event("unknown_customer", "reference:customer", customer_id=999_999_999),
        event(
            "before_subscription",
            "reference:subscription",
            created_at=format_timestamp(now - timedelta(days=40)),
        ),
        event(
            "no_fx_rate_that_day",
            "reference:fx_rate",
            currency="EUR",
            created_at=format_timestamp(now - timedelta(days=40)),
        ),
        event(
            "amount_usd_overflow", "decimal_12_2:amount_usd", amount="9999999999.99", currency="GBP"
        ),
        event(
            "refund_without_payment",
            "refund:original_payment",
            customer_id=QUIET_CUSTOMER,
            transaction_type="REFUND",
            amount="-10.00",
            created_at=format_timestamp(now - timedelta(days=20)),
        ),
    ]
    return corpus


def good_event(index: int, now: datetime) -> bytes:
    """A valid PAYMENT of 10.00 USD by customer 1001: a hostile record's neighbour."""
    return _json(_event("good", now - timedelta(minutes=1), event_id=f"good-{index}"))
