"""Hand-made billing_events rows written straight to a Delta lake, for the aggregate tests
that need exact control over event times and batches (no Kafka involved)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

import polars as pl

from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
)
from billing_dagster.delta_lake import LakeLocation, append_exactly_once

USD_RATES = {"USD": Decimal("1"), "EUR": Decimal("1.10000000"), "GBP": Decimal("1.25000000")}
_offsets = itertools.count()


def event(
    created_at: datetime,
    amount: str,
    *,
    kind: str = "PAYMENT",
    currency: str = "USD",
    customer_id: int = 1001,
    event_id: str | None = None,
) -> dict[str, object]:
    offset = next(_offsets)
    value = Decimal(amount)
    rate = USD_RATES[currency]
    return {
        "event_id": event_id or f"evt-{offset}",
        "customer_id": customer_id,
        "transaction_type": kind,
        "amount": value,
        "currency": currency,
        "metadata": None,
        "tax_amount": None,
        "created_at": created_at,
        "customer_tier": "standard",
        "subscription_plan": "basic",
        "usd_rate": rate,
        "amount_usd": (value * rate).quantize(Decimal("0.01")),
        "kafka_topic": "billing-events",
        "kafka_partition": 0,
        "kafka_offset": offset,
        "kafka_timestamp": created_at,
        "kafka_key": None,
        "ingested_at": datetime.now(UTC),
        "ingest_run_id": "test",
        "year": created_at.year,
        "month": created_at.month,
        "day": created_at.day,
        "hour": created_at.hour,
    }


def write_events(lake: LakeLocation, rows: list[dict[str, object]]) -> None:
    """Append one batch to billing_events the way the ingest step does."""
    frame = pl.DataFrame(rows, schema=BILLING_EVENTS_SCHEMA, orient="row")
    append_exactly_once(
        lake,
        BILLING_EVENTS_TABLE,
        frame,
        topic="billing-events",
        processed_up_to={0: int(frame["kafka_offset"].max()) + 1},
        partition_by=EVENT_HOUR_PARTITIONS,
    )
