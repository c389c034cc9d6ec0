"""Decoding against the contract: pure Polars, no servers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import polars as pl

from billing_dagster.contract import BillingEvent, TransactionType
from billing_dagster.decoding import decode_json_records
from billing_dagster.synthetic import INVALID_VALUES, SyntheticBillingStream

NOW = datetime(2026, 11, 24, 14, 30, tzinfo=UTC)
KAFKA_TIME = datetime(2026, 11, 24, 14, 0, 5, tzinfo=UTC)


def records(values: list[bytes | None]) -> pl.DataFrame:
    n = len(values)
    return pl.DataFrame(
        {
            "kafka_topic": ["t"] * n,
            "kafka_partition": [3] * n,
            "kafka_offset": list(range(100, 100 + n)),
            "kafka_timestamp": [KAFKA_TIME] * n,
            "kafka_key": [b"k"] * n,
            "value": values,
        },
        schema_overrides={"value": pl.Binary, "kafka_key": pl.Binary},
    )


def decode(values: list[bytes | None]):
    return decode_json_records(records(values), run_id="run-1", now=NOW)


def test_valid_event_decodes_with_exact_money_and_event_hour():
    event = BillingEvent(
        event_id="e-1",
        customer_id=42,
        transaction_type=TransactionType.PAYMENT,
        amount=Decimal("1234567890.12"),
        created_at=datetime(2026, 11, 24, 13, 59, 59, 999000, tzinfo=UTC),
        currency="EUR",
        metadata='{"plan": "pro"}',
        tax_amount=Decimal("0.07"),
    )
    batch = decode([event.to_json_bytes()])
    assert batch.quarantine.height == 0
    row = batch.events.row(0, named=True)
    assert row["amount"] == Decimal("1234567890.12")
    assert row["tax_amount"] == Decimal("0.07")
    assert batch.events.schema["amount"] == pl.Decimal(12, 2)
    assert (row["currency"], row["customer_id"], row["transaction_type"]) == ("EUR", 42, "PAYMENT")
    assert row["created_at"] == event.created_at
    assert (row["year"], row["month"], row["day"], row["hour"]) == (2026, 11, 24, 13)
    assert (row["kafka_partition"], row["kafka_offset"]) == (3, 100)


def test_v1_event_without_tax_field_and_v2_event_share_one_frame():
    v1 = b'{"event_id":"a","customer_id":1,"transaction_type":"PAYMENT","amount":"10.00"}'
    v2 = (
        b'{"event_id":"b","customer_id":1,"transaction_type":"REFUND","amount":"-10.00",'
        b'"currency":"GBP","tax_amount":"-2.00","metadata":null}'
    )
    batch = decode([v1, v2])
    assert batch.quarantine.height == 0
    assert batch.events["tax_amount"].to_list() == [None, Decimal("-2.00")]
    # Currency defaults to USD, as in the Avro schema; event time falls back to Kafka's.
    assert batch.events["currency"].to_list() == ["USD", "GBP"]
    assert batch.events["created_at"].to_list()[0] == KAFKA_TIME


def test_json_number_amounts_are_exact_and_extra_precision_is_refused():
    ok = b'{"event_id":"a","customer_id":1,"transaction_type":"PAYMENT","amount":0.1}'
    zeros = b'{"event_id":"b","customer_id":1,"transaction_type":"PAYMENT","amount":"5.100"}'
    refused = b'{"event_id":"c","customer_id":1,"transaction_type":"PAYMENT","amount":0.105}'
    too_big = (
        b'{"event_id":"d","customer_id":1,"transaction_type":"PAYMENT","amount":"12345678901"}'
    )
    batch = decode([ok, zeros, refused, too_big])
    assert batch.events["amount"].to_list() == [Decimal("0.10"), Decimal("5.10")]
    assert batch.quarantine["kafka_offset"].to_list() == [102, 103]
    assert all(r == ["decimal_12_2:amount"] for r in batch.quarantine["rules"].to_list())
    assert "'0.105'" in batch.quarantine["reason"][0]


def test_each_kind_of_bad_record_is_quarantined_with_its_reason_and_bytes():
    values = [
        b"\xff\xfe",
        b"not json",
        b"[1, 2]",
        b"null",
        b"",
        None,
        b'{"event_id":"x","customer_id":"abc","transaction_type":"GIFT","amount":"1"}',
        b'{"event_id":"y","customer_id":1,"transaction_type":"PAYMENT","amount":"1",'
        b'"metadata":{"nested":true}}',
        b'{"event_id":"z","customer_id":1,"transaction_type":"PAYMENT","amount":"1",'
        b'"currency":"usd","created_at":"yesterday"}',
    ]
    batch = decode(values)
    assert batch.events.height == 0
    q = batch.quarantine.sort("kafka_offset")
    assert q["kafka_offset"].to_list() == list(range(100, 109))
    assert q["raw_value"].to_list() == values
    assert q["rules"].to_list() == [
        ["utf8"],
        ["json"],
        ["json_object"],
        ["json_object"],
        ["empty_value"],
        ["empty_value"],
        ["integer:customer_id", "enum:transaction_type"],
        ["field_type"],
        ["format:currency", "timestamp:created_at"],
    ]
    assert "not valid UTF-8" in q["reason"][0]
    assert "customer_id must be a positive integer, got 'abc'" in q["reason"][6]
    assert q["stage"].to_list()[:6] == ["decode"] * 6
    assert q["stage"][6] == "contract"


def test_missing_required_fields_are_named():
    batch = decode([b'{"customer_id": 5}'])
    assert batch.quarantine["rules"][0].to_list() == [
        "required:event_id",
        "required:transaction_type",
        "required:amount",
    ]
    assert "missing required field event_id" in batch.quarantine["reason"][0]


def test_large_batch_isolates_exactly_the_bad_records_and_loses_nothing():
    stream = SyntheticBillingStream(seed=3, invalid_rate=0.01, duplicate_rate=0.02)
    generated = list(stream.records(20_000, now=NOW))
    batch = decode([r.value for r in generated])
    invalid = [i for i, r in enumerate(generated) if r.kind == "invalid"]
    assert len(invalid) > 100
    assert batch.events.height + batch.quarantine.height == len(generated)
    assert sorted(o - 100 for o in batch.quarantine["kafka_offset"].to_list()) == invalid
    # Amounts survive decoding to the cent, in order.
    expected = [r.event.amount for r in generated if r.kind != "invalid"]
    assert batch.events.sort("kafka_offset")["amount"].to_list() == expected


def test_every_synthetic_invalid_value_is_quarantined():
    batch = decode(list(INVALID_VALUES))
    assert batch.events.height == 0
    assert batch.quarantine.height == len(INVALID_VALUES)
    assert batch.quarantine["reason"].null_count() == 0


def test_non_json_constants_are_quarantined_among_good_records():
    good = SyntheticBillingStream(seed=5, invalid_rate=0, duplicate_rate=0)
    values = [r.value for r in good.records(300)]
    values[17] = b'{"event_id":"n","customer_id":1,"transaction_type":"PAYMENT","amount":NaN}'
    values[250] = b'{"event_id":"i","customer_id":1,"transaction_type":"PAYMENT","amount":Infinity}'
    batch = decode(values)
    assert batch.events.height == 298
    assert batch.quarantine["kafka_offset"].to_list() == [117, 350]
    assert batch.quarantine["reason"].to_list() == [
        "value is not valid JSON (NaN is not a JSON value)",
        "value is not valid JSON (Infinity is not a JSON value)",
    ]
