"""Both wire encodings against real Kafka: Confluent Avro through a Schema Registry
(confluent-kafka's `mock://` registry, in-process) and Debezium JSON change events."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import pytest

from billing_dagster.avro_format import AvroEventEncoder, frame_avro, registry_client
from billing_dagster.contract import (
    AVRO_SCHEMA_V2,
    BILLING_EVENTS_TABLE,
    QUARANTINE_TABLE,
    BillingEvent,
    TransactionType,
)
from billing_dagster.delta_lake import read_table
from billing_dagster.settings import ConfigError, load_settings
from billing_dagster.synthetic import GeneratedRecord

from .conftest import Pipeline, pipeline_env
from .test_billing_events import assert_balanced, run_batch

WHEN = datetime.now(UTC) - timedelta(minutes=1)


def record(value: bytes | None, key: bytes = b"1001") -> GeneratedRecord:
    return GeneratedRecord(key=key, value=value, kind="crafted")  # type: ignore[arg-type]


def event(**changes: object) -> BillingEvent:
    fields: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "customer_id": 1001,
        "transaction_type": TransactionType.PAYMENT,
        "amount": Decimal("12.34"),
        "created_at": WHEN.replace(microsecond=WHEN.microsecond // 1000 * 1000),
        "currency": "EUR",
        "tax_amount": Decimal("2.06"),
    }
    fields.update(changes)
    return BillingEvent(**fields)  # type: ignore[arg-type]


@pytest.fixture
def avro_pipeline(kafka, topic, lake_root, serving_url) -> Pipeline:
    return Pipeline(
        pipeline_env(
            kafka,
            topic,
            lake_root,
            serving_url,
            BILLING_TOPIC_FORMATS=f"{topic}=avro",
            BILLING_SCHEMA_REGISTRY_URL=f"mock://{topic}",
        )
    )


def test_avro_v1_and_v2_decode_into_one_frame_and_bad_schemas_are_quarantined(
    avro_pipeline: Pipeline,
):
    topic = avro_pipeline.settings.topic
    registry_url = avro_pipeline.settings.schema_registry_url
    encoder = AvroEventEncoder(registry_url, f"{topic}-value")
    v2 = [event(amount=Decimal(f"{i + 10}.25")) for i in range(1, 41)]
    v1 = [event(amount=Decimal(f"{i}.50"), tax_amount=None) for i in range(1, 21)]
    good = [record(encoder.encode(e)) for e in v2] + [
        record(encoder.encode(e, include_tax_field=False)) for e in v1
    ]

    # A writer whose customer_id is a string cannot be read as the contract.
    from confluent_kafka.schema_registry import Schema

    incompatible = {
        **AVRO_SCHEMA_V2,
        "fields": [
            {"name": "customer_id", "type": "string"} if f["name"] == "customer_id" else f
            for f in AVRO_SCHEMA_V2["fields"]
        ],
    }
    bad_id = registry_client(registry_url).register_schema(
        f"{topic}-other", Schema(json.dumps(incompatible), "AVRO")
    )
    wrong_schema = frame_avro(
        bad_id,
        incompatible,
        {
            "event_id": "e-bad-schema",
            "customer_id": "1001",
            "transaction_type": "PAYMENT",
            "amount": Decimal("1.00"),
            "currency": "USD",
            "metadata": None,
            "created_at": None,
            "tax_amount": None,
        },
    )
    unknown_id = b"\x00\x00\x00\x98\x76" + encoder.encode(v2[0])[5:]
    truncated = encoder.encode(event())[:-6]
    json_on_avro_topic = event().to_json_bytes()
    bad = [wrong_schema, unknown_id, truncated, json_on_avro_topic]
    avro_pipeline.produce(good[:30] + [record(b) for b in bad] + good[30:])

    meta, _ = run_batch(avro_pipeline, dg.DagsterInstance.ephemeral())
    assert_balanced(meta)
    rows = read_table(avro_pipeline.lake, BILLING_EVENTS_TABLE)
    by_id = {r["event_id"]: r for r in rows.iter_rows(named=True)}
    quarantine_rows = read_table(avro_pipeline.lake, QUARANTINE_TABLE)
    assert set(by_id) == {e.event_id for e in v1 + v2}, quarantine_rows.select(
        "rules", "reason"
    ).rows()
    for e in v2:
        assert by_id[e.event_id]["amount"] == e.amount
        assert by_id[e.event_id]["tax_amount"] == Decimal("2.06")
        assert by_id[e.event_id]["created_at"] == e.created_at
        assert by_id[e.event_id]["amount_usd"] is not None
    for e in v1:
        assert by_id[e.event_id]["tax_amount"] is None  # v1 has no such field
        assert by_id[e.event_id]["amount"] == e.amount

    quarantine = {
        r["raw_value"]: r
        for r in read_table(avro_pipeline.lake, QUARANTINE_TABLE).iter_rows(named=True)
    }
    assert set(quarantine) == set(bad)
    assert quarantine[wrong_schema]["rules"] == ["schema:incompatible"]
    assert "field customer_id must be a long" in quarantine[wrong_schema]["reason"]
    assert quarantine[unknown_id]["rules"] == ["schema:unknown"]
    assert quarantine[truncated]["rules"] == ["avro"]
    assert quarantine[json_on_avro_topic]["rules"] == ["avro_framing"]


def debezium(
    table: str, op: str, after: dict | None, before: dict | None = None, *, wrapped: bool = False
) -> bytes:
    envelope = {
        "before": before,
        "after": after,
        "source": {
            "connector": "postgresql",
            "db": "billing",
            "schema": "billing",
            "table": table,
            "lsn": 123456,
            "txId": 789,
            "ts_ms": 1,
        },
        "op": op,
        "ts_ms": 2,
        "transaction": None,
    }
    if wrapped:  # JsonConverter with schemas.enable=true
        envelope = {"schema": {"type": "struct", "name": "envelope"}, "payload": envelope}
    return json.dumps(envelope).encode()


def test_debezium_change_events_map_to_billing_events(kafka, topic, lake_root, serving_url):
    pipeline = Pipeline(
        pipeline_env(
            kafka, topic, lake_root, serving_url, BILLING_TOPIC_FORMATS=f"{topic}=debezium-json"
        )
    )
    stamp = WHEN.isoformat().replace("+00:00", "Z")
    txn_id, pay_id, refund_id, cb_id = (str(uuid.uuid4()) for _ in range(4))
    payment = {
        "payment_id": pay_id,
        "invoice_id": "inv-1",
        "customer_id": 1001,
        "amount": "120.00",
        "currency": "GBP",
        "tax_amount": "20.00",
        "created_at": stamp,
    }
    values = {
        "transaction": debezium(
            "transactions",
            "c",
            {
                "transaction_id": txn_id,
                "customer_id": 1001,
                "transaction_type": "ADJUSTMENT",
                "amount": "-3.50",
                "currency": "USD",
                "metadata": "goodwill",
                "created_at": stamp,
            },
        ),
        "payment": debezium("payments", "r", payment, wrapped=True),  # a snapshot read
        "refund": debezium(
            "refunds",
            "c",
            {
                "refund_id": refund_id,
                "payment_id": pay_id,
                "customer_id": 1001,
                "amount": "20.00",
                "currency": "GBP",
                "kind": "refund",
                "reason": "damaged",
                "created_at": stamp,
            },
        ),
        "chargeback": debezium(
            "refunds",
            "c",
            {
                "refund_id": cb_id,
                "payment_id": pay_id,
                "customer_id": 1001,
                "amount": "100.00",
                "currency": "GBP",
                "kind": "chargeback",
                "created_at": stamp,
            },
        ),
        "update": debezium("payments", "u", {**payment, "amount": "1.00"}, before=payment),
        "delete": debezium("payments", "d", None, before=payment),
        "subscription": debezium(
            "subscriptions", "c", {"subscription_id": "s-9", "customer_id": 1001}
        ),
        "not_json": b'{"before": null, "after": {"payment_id": ',
    }
    pipeline.produce([record(v) for v in values.values()] + [record(None)])

    meta, _ = run_batch(pipeline, dg.DagsterInstance.ephemeral())
    assert_balanced(meta)
    rows = {
        r["event_id"]: r
        for r in read_table(pipeline.lake, BILLING_EVENTS_TABLE).iter_rows(named=True)
    }
    assert set(rows) == {txn_id, pay_id, refund_id, cb_id}
    assert (rows[txn_id]["transaction_type"], rows[txn_id]["amount"]) == (
        "ADJUSTMENT",
        Decimal("-3.50"),
    )
    assert (rows[pay_id]["transaction_type"], rows[pay_id]["amount"]) == (
        "PAYMENT",
        Decimal("120.00"),
    )
    assert rows[pay_id]["tax_amount"] == Decimal("20.00")
    assert json.loads(rows[pay_id]["metadata"]) == {"invoice_id": "inv-1"}
    # Refund rows hold the positive amount returned; as events they are negative.
    assert (rows[refund_id]["transaction_type"], rows[refund_id]["amount"]) == (
        "REFUND",
        Decimal("-20.00"),
    )
    assert (rows[cb_id]["transaction_type"], rows[cb_id]["amount"]) == (
        "CHARGEBACK",
        Decimal("-100.00"),
    )
    assert json.loads(rows[refund_id]["metadata"]) == {"payment_id": pay_id, "reason": "damaged"}

    quarantine = {
        r["raw_value"]: r for r in read_table(pipeline.lake, QUARANTINE_TABLE).iter_rows(named=True)
    }
    assert quarantine[values["update"]]["rules"] == ["cdc:immutable"]
    assert f"op=u on row {pay_id}" in quarantine[values["update"]]["reason"]
    assert quarantine[values["delete"]]["rules"] == ["cdc:immutable"]
    assert quarantine[values["subscription"]]["rules"] == ["cdc:table"]
    assert (
        "billing.subscriptions are reference data" in quarantine[values["subscription"]]["reason"]
    )
    assert quarantine[values["not_json"]]["rules"] == ["json"]
    assert quarantine[None]["rules"] == ["empty_value"]  # the tombstone after a delete


def test_topic_format_settings_are_checked():
    with pytest.raises(ConfigError, match="BILLING_SCHEMA_REGISTRY_URL must be set"):
        load_settings({"BILLING_TOPIC_FORMATS": "avro"})
    with pytest.raises(ConfigError, match="BILLING_TOPIC_FORMATS"):
        load_settings({"BILLING_TOPIC_FORMATS": "billing-events=protobuf"})
    with pytest.raises(ConfigError, match="BILLING_SCHEMA_REGISTRY_URL"):
        load_settings({"BILLING_SCHEMA_REGISTRY_URL": "registry:8081"})
    with pytest.raises(ConfigError, match="BILLING_SUPPORTED_CURRENCIES"):
        load_settings({"BILLING_SUPPORTED_CURRENCIES": "USD,euro"})
    settings = load_settings(
        {
            "BILLING_TOPIC_FORMATS": "a=avro, b=debezium-json",
            "BILLING_SCHEMA_REGISTRY_URL": "mock://x",
        }
    )
    assert settings.topic_formats == {"a": "avro", "b": "debezium-json"}
