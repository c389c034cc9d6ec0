"""The Postgres serving step of one large batch: history insert and balance upsert.

Starts a throwaway Postgres with the project's own scripts, migrates it, and applies a
batch of --events accepted events (default 1M, over --customers customers, spread over
two months so two history partitions are created) with `serving.apply_batch`, the same
function the ingest asset calls, then a second batch of as many events over the same
customers (the upsert now updates existing rows). Prints rows/s per phase, then applies
the last batch again to show what a replay costs (it must change nothing), and checks
the sum of balances against the batches.

    .venv/bin/python bench/serving_batch.py --events 1000000 --customers 100000
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

import polars as pl
from dedupe_lookup import CpuClock  # bench/ is the script folder, so on sys.path
from machine_info import machine

from billing_dagster.local_infra.postgres import LocalPostgres
from billing_dagster.postgres_db import migrate
from billing_dagster.serving import read_balances
from billing_dagster.serving_batch import apply_batch

PARTITIONS = 24


def accepted_batch(events: int, customers: int, seed: int) -> pl.DataFrame:
    """Accepted events as the cleaning step hands them over (only the columns used)."""
    index = pl.int_range(0, events, eager=True)
    types = ["PAYMENT"] * 7 + ["REFUND", "CHARGEBACK", "ADJUSTMENT"]
    start = datetime(2026, 10, 20, tzinfo=UTC)
    frame = pl.DataFrame({"i": index}).with_columns(
        event_id=pl.format(
            "{}-0000-4000-8000-{}",
            pl.col("i").cast(pl.String).str.zfill(8),
            pl.lit(f"{seed:012d}"),
        ),
        customer_id=(pl.col("i").hash(seed) % customers + 1).cast(pl.Int64),
        transaction_type=(pl.col("i") % len(types)).replace_strict(
            dict(enumerate(types)), return_dtype=pl.String
        ),
        cents=(pl.col("i").hash(seed + 1) % 50_000 + 100).cast(pl.Int64),
        created_at=pl.lit(start) + pl.duration(seconds=pl.col("i") * (30 * 86_400 // events)),
        kafka_partition=(pl.col("i") % PARTITIONS).cast(pl.Int32),
        kafka_offset=pl.col("i") // PARTITIONS,
    )
    signed = (
        pl.when(pl.col("transaction_type").is_in(["REFUND", "CHARGEBACK"]))
        .then(-pl.col("cents"))
        .otherwise(pl.col("cents"))
    )
    # Scale 2 before dividing: Decimal(18, 0) / 100 keeps scale 0 (whole dollars).
    amount = (signed.cast(pl.Decimal(18, 2)) / 100).cast(pl.Decimal(12, 2))
    return frame.with_columns(
        amount=amount, amount_usd=amount, currency=pl.lit("USD"), kafka_topic=pl.lit("bench")
    ).drop("i", "cents")


def report(
    label: str, events: int, url: str, batch: pl.DataFrame, ranges: dict, clock: CpuClock
) -> None:
    result, total, client_cpu, server_cpu = clock.measure(
        lambda: apply_batch(url, batch, topic="bench", ranges=ranges, run_id=label)
    )
    laps = result.timings
    # One statement inserts the history rows and folds exactly those into the balances.
    history = laps["copy_history"] + laps["insert_history_and_balances"]
    balances = history
    print(
        f"{label}: {events:,} events, {result.customers_updated:,} customers, "
        f"partitions created {list(result.partitions_created)}"
    )
    for phase, seconds in laps.items():
        print(f"  {phase:<16} {seconds:7.2f} s")
    print(
        f"  history insert + balance upsert (COPY, INSERT ... RETURNING, upsert of "
        f"{result.customers_updated:,} balances): {result.history_inserted / history:>10,.0f} "
        f"rows/s ({events / balances:,.0f} events/s folded into balances)"
    )
    print(f"  whole apply_batch incl. commit: {events / total:,.0f} events/s")
    # On a shared machine CPU says what the batch cost; wall time, what it took there.
    print(f"  CPU: {client_cpu:.2f} s here, {server_cpu:.2f} s in the Postgres server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    postgres = LocalPostgres(database="serving_bench").start()  # durable, as in production
    clock = CpuClock(postgres)
    try:
        migrate(postgres.url)
        ends: dict[int, int] = {}
        for label, seed, shift in (
            ("first batch, new customers", 7, 0),
            ("second batch, existing customers", 8, 1),
        ):
            batch = accepted_batch(args.events, args.customers, seed=seed).with_columns(
                pl.col("kafka_offset") + shift * (args.events // PARTITIONS + 1)
            )
            ranges = {
                p: (ends.get(p, 0), end)
                for p, end in batch.group_by("kafka_partition")
                .agg(pl.col("kafka_offset").max() + 1)
                .rows()
            }
            ends = {p: end for p, (_, end) in ranges.items()}
            report(label, args.events, postgres.url, batch, ranges, clock)
        everything = pl.concat(
            [accepted_batch(args.events, args.customers, seed=s) for s in (7, 8)]
        )
        started = time.perf_counter()
        replay = apply_batch(postgres.url, batch, topic="bench", ranges=ranges, run_id="again")
        print(
            f"replay of the same batch: {replay.events_applied} applied, "
            f"{replay.events_already_applied:,} already applied, "
            f"{time.perf_counter() - started:.2f} s"
        )
        served = read_balances(postgres.url)
        expected = everything["amount_usd"].sum()
        served_total = served["current_balance"].cast(pl.Decimal(18, 2)).sum()
        print(f"balances sum {served_total}, batches {expected}, equal: {served_total == expected}")
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()
