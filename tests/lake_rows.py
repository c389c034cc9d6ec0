"""Hand-made billing_events rows written straight to a Delta lake, for the aggregate tests
that need exact control over event times and batches (no Kafka involved); and the
independent expectations the serving tests compare Postgres with."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal

import polars as pl

from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
)
from billing_dagster.delta_lake import LakeLocation, append_exactly_once
from billing_dagster.enrichment import ReferenceData, usd_amount_of
from billing_dagster.postgres_db import connect
from billing_dagster.serving import read_balances
from billing_dagster.synthetic import GeneratedRecord

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


# ---- independent expectations for the serving layer ----------------------------------


def expected_balances(
    records: list[GeneratedRecord], reference: ReferenceData
) -> dict[int, Decimal]:
    """Balances computed independently of the pipeline: each event_id of a valid record
    once, converted to USD with Decimal at the rate of its created_at's day."""
    rates = {
        (r["rate_date"], r["currency"]): r["usd_rate"]
        for r in reference.fx_rates.iter_rows(named=True)
    }
    events = {r.event.event_id: r.event for r in records if r.event is not None}
    totals: dict[int, Decimal] = defaultdict(lambda: Decimal("0.00"))
    for event in events.values():
        rate = (
            Decimal(1)
            if event.currency == "USD"
            else rates[(event.created_at.date(), event.currency)]
        )
        totals[event.customer_id] += usd_amount_of(event.amount, rate)
    return dict(totals)


def balances(url: str) -> dict[int, Decimal]:
    """customer_id -> current_balance, exact."""
    return dict(read_balances(url).select("customer_id", "current_balance").iter_rows())


def balances_not_matching_history(url: str) -> list[tuple]:
    """Customers whose balance is not the sum of their transaction_history rows (either
    side missing counts as a mismatch): empty when the serving layer is consistent."""
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT customer_id, b.current_balance, h.total FROM customer_balances AS b "
            "FULL JOIN (SELECT customer_id, sum(amount_usd) AS total "
            "           FROM transaction_history GROUP BY customer_id) AS h "
            "USING (customer_id) WHERE b.current_balance IS DISTINCT FROM h.total"
        )
        return cursor.fetchall()


def history_counts(url: str) -> tuple[int, int]:
    """(rows, distinct event_ids) of transaction_history."""
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*), count(DISTINCT event_id) FROM transaction_history")
        rows, distinct = cursor.fetchone()
        return rows, distinct


@contextmanager
def balance_writes_held(url: str) -> Iterator[None]:
    """Writes to customer_balances wait while this lasts (reads do not): an ingest run
    that gets there is deterministically mid-batch, nothing of it committed anywhere."""
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("LOCK TABLE customer_balances IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            connection.rollback()
