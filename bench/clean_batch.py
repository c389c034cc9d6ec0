"""Decode + validate + dedupe of one large batch in one process, measured stage by stage.

The batch (default 1M synthetic events, JSON and/or Confluent Avro) is built in memory as
Kafka records would arrive. A billing_events history of --history earlier events is
written to a temporary Delta lake first, and the batch redelivers 1% of it, so dedupe
works against real Delta reads, not an empty table.

    .venv/bin/python bench/clean_batch.py --events 1000000 --format both
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import UTC, datetime

import polars as pl
from machine_info import machine  # bench/ is the script folder, so on sys.path

from billing_dagster.avro_format import AvroEventEncoder, SchemaRegistrySource
from billing_dagster.cleaning import clean_events
from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
    KAFKA_RECORD_SCHEMA,
)
from billing_dagster.decoding import ValueFormat, decode_records
from billing_dagster.dedupe import accepted_before_in_lake
from billing_dagster.delta_lake import LakeLocation, append_exactly_once
from billing_dagster.ingest import first_payments
from billing_dagster.rules import ValidationPolicy
from billing_dagster.synthetic import SyntheticBillingStream

TOPIC = "bench"


def as_records(values: list[bytes], keys: list[bytes], first_offset: int) -> pl.DataFrame:
    now = datetime.now(UTC)
    n = len(values)
    return pl.DataFrame(
        {
            "kafka_topic": [TOPIC] * n,
            "kafka_partition": [i % 24 for i in range(n)],
            "kafka_offset": [first_offset + i // 24 for i in range(n)],
            "kafka_timestamp": [now] * n,
            "kafka_key": keys,
            "value": values,
        },
        schema=KAFKA_RECORD_SCHEMA,
    )


def timed(label: str, n: int, fn):
    # CPU beside wall time: on a shared machine, CPU says what a stage costs.
    started, cpu = time.perf_counter(), time.process_time()
    result = fn()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"  {label:<34} {n / seconds:>12,.0f} events/s  ({seconds:6.2f} s, CPU {cpu:6.2f} s)")
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--format", choices=["json", "avro", "both"], default="both")
    parser.add_argument("--invalid-rate", type=float, default=0.005, help="0: a clean batch")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"batch: {args.events:,} events (1% duplicate deliveries, {args.invalid_rate:.2%} "
        f"invalid, 1% redeliveries of a {args.history:,}-event history)"
    )

    stream = SyntheticBillingStream(seed=5, duplicate_rate=0.01, invalid_rate=args.invalid_rate)
    reference = stream.reference_data()
    policy = ValidationPolicy()
    history = list(stream.records(args.history))
    batch = list(stream.records(args.events))
    rng = random.Random(1)
    redelivered = rng.sample([r for r in history if r.kind == "valid"], args.events // 100)
    batch = batch[: args.events - len(redelivered)] + redelivered
    rng.shuffle(batch)

    with tempfile.TemporaryDirectory() as lake_dir:
        lake = LakeLocation(lake_dir)
        # The history, accepted earlier: straight into billing_events.
        hist_frame = as_records([r.value for r in history], [r.key for r in history], 0)
        decoded = decode_records(hist_frame, run_id="history", now=datetime.now(UTC))
        cleaned = clean_events(
            decoded.events,
            accepted_before=accepted_before_in_lake(lake, decoded.events),
            first_payments=first_payments(lake, decoded.events),
            reference=reference,
            policy=policy,
            run_id="history",
            now=datetime.now(UTC),
        )
        append_exactly_once(
            lake,
            BILLING_EVENTS_TABLE,
            cleaned.accepted,
            topic=TOPIC,
            processed_up_to={p: args.history for p in range(24)},
            partition_by=EVENT_HOUR_PARTITIONS,
        )
        print(f"history: {cleaned.accepted.height:,} accepted events in billing_events")

        formats = ["json", "avro"] if args.format == "both" else [args.format]
        for fmt in formats:
            if fmt == "avro":
                encoder = AvroEventEncoder("mock://bench", f"{TOPIC}-value")
                values = [
                    encoder.encode(r.event, include_tax_field=r.event.tax_amount is not None)
                    if r.event
                    else r.value
                    for r in batch
                ]
                registry = SchemaRegistrySource("mock://bench")
            else:
                values, registry = [r.value for r in batch], None
            frame = as_records(values, [r.key for r in batch], args.history)
            print(f"{fmt}:")
            decoded, t_decode = timed(
                "decode + contract rules",
                frame.height,
                lambda frame=frame, fmt=fmt, registry=registry: decode_records(
                    frame,
                    value_format=ValueFormat(fmt),
                    registry=registry,
                    run_id="bench",
                    now=datetime.now(UTC),
                ),
            )
            events = decoded.events
            (prior, payments), t_lookup = timed(
                "dedupe lookups in billing_events",
                events.height,
                lambda events=events: (
                    accepted_before_in_lake(lake, events),
                    first_payments(lake, events),
                ),
            )
            cleaned, t_clean = timed(
                "dedupe + enrich + business rules",
                events.height,
                lambda events=events, prior=prior, payments=payments: clean_events(
                    events,
                    accepted_before=prior,
                    first_payments=payments,
                    reference=reference,
                    policy=policy,
                    run_id="bench",
                    now=datetime.now(UTC),
                ),
            )
            total = t_decode + t_lookup + t_clean
            counts = cleaned.counts
            balanced = frame.height == (
                counts["accepted"]
                + counts["duplicates"]
                + counts["quarantined"]
                + decoded.quarantine.height
            )
            print(
                f"  {'total decode+validate+dedupe':<34} {frame.height / total:>12,.0f} "
                f"events/s  ({total:6.2f} s)"
            )
            print(
                f"  accepted {counts['accepted']:,}, duplicates {counts['duplicates']:,}, "
                f"quarantined {counts['quarantined'] + decoded.quarantine.height:,}; "
                f"counts balance: {balanced}"
            )


if __name__ == "__main__":
    main()
