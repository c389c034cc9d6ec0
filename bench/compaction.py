"""What small files cost the reads every micro-batch makes, and what compaction gives back.

Writes one event hour of billing_events the way steady-state ingest does: --batches
micro-batches (each its own exactly-once append, so one file per batch) of --batch-size
accepted events. Then times, before and after `compact_hours`:
  - the dedupe lookup of a new batch (`accepted_before_in_lake`),
  - the quality check's read (`checked_batch_rows`),
  - the aggregate refresh's read of the day (`events_of_days`).

    .venv/bin/python bench/compaction.py --batches 360 --batch-size 3000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta

import polars as pl
from clean_batch import as_records
from machine_info import machine  # bench/ is the script folder, so on sys.path

from billing_dagster.aggregates import events_of_days
from billing_dagster.batch_check import checked_batch_rows
from billing_dagster.cleaning import clean_events
from billing_dagster.compaction import compact_hours
from billing_dagster.contract import BILLING_EVENTS_TABLE, EVENT_HOUR_PARTITIONS
from billing_dagster.decoding import decode_json_records
from billing_dagster.dedupe import accepted_before_in_lake
from billing_dagster.delta_lake import LakeLocation, append_exactly_once
from billing_dagster.ingest import first_payments
from billing_dagster.offsets import OffsetRange, hour_key, hour_start
from billing_dagster.rules import ValidationPolicy
from billing_dagster.synthetic import SyntheticBillingStream

TOPIC = "bench"


def timed(fn) -> tuple[object, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=360)
    parser.add_argument("--batch-size", type=int, default=3000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"one event hour of billing_events in {args.batches} micro-batches of "
        f"{args.batch_size:,} events ({args.batches * args.batch_size:,} rows)"
    )
    hour = hour_start(datetime.now(UTC)) - timedelta(hours=1)
    stream = SyntheticBillingStream(seed=4, invalid_rate=0, duplicate_rate=0)
    reference = stream.reference_data()
    lake = LakeLocation(tempfile.mkdtemp(prefix="bench-compaction-"))
    records = list(stream.records(args.batches * args.batch_size, now=hour + timedelta(minutes=30)))
    frame = as_records([r.value for r in records], [r.key for r in records], 0)
    now = datetime.now(UTC)
    events = decode_json_records(frame, run_id="bench", now=now).events
    accepted = clean_events(
        events,
        accepted_before=accepted_before_in_lake(lake, events.head(0)),
        first_payments=first_payments(lake, events.head(0)),
        reference=reference,
        policy=ValidationPolicy(),
        run_id="bench",
        now=now,
    ).accepted.sort("kafka_offset", "kafka_partition")
    started = time.perf_counter()
    for index in range(args.batches):
        batch = accepted.slice(index * args.batch_size, args.batch_size)
        append_exactly_once(
            lake,
            BILLING_EVENTS_TABLE,
            batch,
            topic=TOPIC,
            processed_up_to={
                p: int(o) + 1
                for p, o in batch.group_by("kafka_partition")
                .agg(pl.col("kafka_offset").max())
                .iter_rows()
            },
            partition_by=EVENT_HOUR_PARTITIONS,
        )
    print(f"written in {time.perf_counter() - started:.1f} s")

    last = accepted.tail(args.batch_size)
    ranges = [
        OffsetRange(p, lo, hi + 1)
        for p, lo, hi in last.group_by("kafka_partition")
        .agg(pl.col("kafka_offset").min().alias("lo"), pl.col("kafka_offset").max().alias("hi"))
        .iter_rows()
    ]

    def measure(label: str) -> None:
        table = lake.open(BILLING_EVENTS_TABLE)
        files = len(table.file_uris())
        _, lookup = timed(lambda: accepted_before_in_lake(lake, last))
        _, check = timed(lambda: checked_batch_rows(lake, TOPIC, [hour_key(hour)], ranges))
        _, day = timed(lambda: events_of_days(lake, [hour.date()], table.version()))
        print(
            f"{label:<18} {files:>6,} files   dedupe lookup {lookup:6.2f} s   "
            f"quality-check read {check:6.2f} s   day read for aggregates {day:6.2f} s"
        )

    measure("before compaction")
    result, seconds = timed(lambda: compact_hours(lake, BILLING_EVENTS_TABLE, [hour]))
    print(
        f"compact_hours: {result.files_removed:,} files -> {result.files_added} in {seconds:.1f} s"
    )
    measure("after compaction")


if __name__ == "__main__":
    main()
