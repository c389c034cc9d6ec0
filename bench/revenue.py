"""Aggregates, daily reconciliation and the month-end report on a month of events.

Builds a local lake with --events accepted events (default 1M) spread evenly over the 30
days of November 2026, written to billing_events and raw/ in batches of --batch events as
the ingest step would, then times, with the project's own functions:

1. the first aggregate build (every day recomputed);
2. an incremental refresh after one more batch of new events on the last day;
3. a refresh after a batch of late events spread over 3 earlier days;
4. reconcile_day for one day;
5. monthly_report for the whole month.

    .venv/bin/python bench/revenue.py --events 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import polars as pl
from machine_info import machine  # bench/ is the script folder, so on sys.path

from billing_dagster.aggregates import refresh_aggregates
from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
    RAW_EVENT_SCHEMA,
    RAW_TABLE,
)
from billing_dagster.delta_lake import LakeLocation, append_exactly_once
from billing_dagster.enrichment import ReferenceData, demo_reference_data, enrich
from billing_dagster.monthly_report import monthly_report
from billing_dagster.reconciliation import reconcile_day, write_reconciliation

MONTH = date(2026, 11, 1)
CUSTOMERS = 20_000
TYPES = ["PAYMENT"] * 7 + ["REFUND", "CHARGEBACK", "ADJUSTMENT"]
_next_offset = 0


def events(
    count: int, first: datetime, span: timedelta, seed: int, reference: ReferenceData
) -> pl.DataFrame:
    """Accepted events in USD, EUR and GBP between `first` and `first + span`."""
    global _next_offset
    offsets = pl.int_range(_next_offset, _next_offset + count, eager=True)
    _next_offset += count
    step_us = max(1, int(span / timedelta(microseconds=1)) // count)
    currencies = ["USD", "EUR", "GBP"]
    frame = pl.DataFrame({"kafka_offset": offsets}).with_columns(
        event_id=pl.format("evt-{}-{}", pl.lit(seed), pl.col("kafka_offset")),
        customer_id=(pl.col("kafka_offset").hash(seed) % CUSTOMERS + 1001).cast(pl.Int64),
        transaction_type=(pl.col("kafka_offset") % len(TYPES)).replace_strict(
            dict(enumerate(TYPES)), return_dtype=pl.String
        ),
        currency=(pl.col("kafka_offset") % 3).replace_strict(
            dict(enumerate(currencies)), return_dtype=pl.String
        ),
        cents=(pl.col("kafka_offset").hash(seed + 1) % 50_000 + 100).cast(pl.Int64),
        created_at=pl.lit(first)
        + pl.duration(microseconds=(pl.col("kafka_offset") - offsets[0]) * step_us),
    )
    signed = (
        pl.when(pl.col("transaction_type").is_in(["REFUND", "CHARGEBACK"]))
        .then(-pl.col("cents"))
        .otherwise(pl.col("cents"))
    )
    # Scale 2 before dividing: Decimal(18, 0) / 100 keeps scale 0 (whole dollars).
    amount = (signed.cast(pl.Decimal(18, 2)) / 100).cast(pl.Decimal(12, 2))
    # Priced by the same enrichment as the ingest step, so the batch side agrees.
    frame = enrich(
        frame.with_columns(
            amount=amount,
            metadata=pl.lit(None, pl.String),
            tax_amount=pl.lit(None, pl.Decimal(12, 2)),
        ),
        reference,
    ).with_columns(
        kafka_topic=pl.lit("billing-events"),
        kafka_partition=pl.lit(0, pl.Int32),
        kafka_timestamp=pl.col("created_at"),
        kafka_key=pl.lit(None, pl.Binary),
        ingested_at=pl.lit(datetime.now(UTC)),
        ingest_run_id=pl.lit("bench"),
        year=pl.col("created_at").dt.year().cast(pl.Int32),
        month=pl.col("created_at").dt.month().cast(pl.Int32),
        day=pl.col("created_at").dt.day().cast(pl.Int32),
        hour=pl.col("created_at").dt.hour().cast(pl.Int32),
    )
    return frame.select(list(BILLING_EVENTS_SCHEMA)).cast(BILLING_EVENTS_SCHEMA)  # type: ignore[arg-type]


def write(lake: LakeLocation, batch: pl.DataFrame) -> None:
    up_to = {0: int(batch["kafka_offset"].max()) + 1}
    for name, schema in (
        (BILLING_EVENTS_TABLE, BILLING_EVENTS_SCHEMA),
        (RAW_TABLE, RAW_EVENT_SCHEMA),
    ):
        append_exactly_once(
            lake,
            name,
            batch.select(list(schema)),
            topic="billing-events",
            processed_up_to=up_to,
            partition_by=EVENT_HOUR_PARTITIONS,
        )


def timed(label: str, action):
    start = time.perf_counter()
    result = action()
    elapsed = time.perf_counter() - start
    print(f"{label:<58} {elapsed:8.2f} s")
    return result, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    reference = demo_reference_data(
        range(1001, 1001 + CUSTOMERS),
        first_day=MONTH - timedelta(days=1),
        days=32,
        plans={"basic": Decimal("10.00")},
        subscribed_since=datetime(2026, 1, 1),
    )
    with tempfile.TemporaryDirectory() as folder:
        lake = LakeLocation(f"{folder}/lake")
        start = datetime.combine(MONTH, datetime.min.time(), tzinfo=UTC)
        # 29 days of history; step 2 then adds new (on-time) events on day 30.
        span = timedelta(days=29) / (args.events // args.batch)
        t0 = time.perf_counter()
        for i in range(args.events // args.batch):
            write(lake, events(args.batch, start + i * span, span, seed=i, reference=reference))
        print(
            f"lake: {args.events:,} events over 29 days in {args.events // args.batch} "
            f"batches, written in {time.perf_counter() - t0:.1f} s"
        )

        refresh, elapsed = timed(
            "1. first aggregate build (29 days)", lambda: refresh_aggregates(lake)
        )
        print(f"   {args.events / elapsed:,.0f} events/s, {len(refresh.days)} days")

        small = 10_000
        write(lake, events(small, start + timedelta(days=29), timedelta(hours=1), 900, reference))
        refresh, elapsed = timed(
            f"2. incremental refresh, {small:,} new events on 1 day",
            lambda: refresh_aggregates(lake),
        )
        print(f"   days recomputed: {len(refresh.days)}; late events {refresh.late_events}")

        write(lake, events(small, start + timedelta(days=26), timedelta(days=3), 901, reference))
        refresh, elapsed = timed(
            f"3. refresh, {small:,} late events over 3 days", lambda: refresh_aggregates(lake)
        )
        print(f"   days recomputed: {len(refresh.days)}; late events {refresh.late_events}")

        day = (start + timedelta(days=14)).date()
        result, elapsed = timed(
            f"4. reconcile_day {day} (~{args.events // 29:,} events)",
            lambda: reconcile_day(lake, day, reference),
        )
        print(f"   status {result.status}, max discrepancy {result.max_discrepancy_pct}%")
        write_reconciliation(lake, result)

        report, elapsed = timed(
            f"5. monthly_report {MONTH:%Y-%m} ({args.events + 2 * small:,} events)",
            lambda: monthly_report(lake, MONTH, reference),
        )
        print(
            f"   status {'reconciled' if report.within_tolerance else 'mismatch'} "
            f"({report.days_reconciled} day reconciled daily, "
            f"{len(report.days_not_reconciled)} not)"
        )


if __name__ == "__main__":
    main()
