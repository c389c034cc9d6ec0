"""Steady-state latency: a producer at a fixed rate for minutes, with the sensor and
`dagster-daemon` running as in production.

Starts Apache Kafka, Postgres and `dagster-daemon` on this repository's workspace (the
`kafka_offsets_sensor`, the run queue of dev/dagster.yaml, one run process per
micro-batch, each with its quality checks and aggregate refresh). A warm-up batch goes
through first. Then billing events are produced at --rate for --duration seconds.

Latency of a record = the commit of the Postgres transaction that put it in the balances
(`balance_batches.applied_at`, taken with clock_timestamp() just before commit) minus its
Kafka CreateTime (set by the producer when it sent it). Both clocks are this machine's.

    .venv/bin/python bench/steady_latency.py --rate 1000 --duration 180
    .venv/bin/python bench/steady_latency.py --rate 10000 --duration 180
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg
import polars as pl
from harness import (
    add_engine_arguments,
    caught_up,
    daemon,
    end_offsets,
    engine_settings,
    latencies,
    percentiles,
    pipeline_stack,
    print_lane_overlap,
    print_profile,
    step_profile,
    wait_until,
)
from machine_info import machine  # bench/ is the script folder, so on sys.path

from billing_dagster.contract import RAW_TABLE
from billing_dagster.delta_lake import scan_table
from billing_dagster.pacing import run_at_rate
from billing_dagster.producer import make_producer, send_value

CUSTOMERS = 100_000


def billing_events(count: int, rng: random.Random) -> Iterator[tuple[bytes, bytes]]:
    """Valid JSON billing events created now (payments, adjustments; 1% redelivered).
    Formatted directly: the synthetic stream's generator cannot keep up with 10K/s
    beside the pipeline on two cores."""
    recent: list[tuple[bytes, bytes]] = []
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    for _ in range(count):
        if recent and rng.random() < 0.01:
            yield rng.choice(recent)
            continue
        customer = 1001 + rng.randrange(CUSTOMERS)
        kind, cents = ("PAYMENT", rng.randrange(100, 50_000))
        if rng.random() < 0.05:
            kind = "ADJUSTMENT"
        value = (
            f'{{"event_id":"{uuid.uuid4()}","customer_id":{customer},'
            f'"transaction_type":"{kind}","amount":"{cents // 100}.{cents % 100:02d}",'
            f'"currency":"USD","metadata":null,"created_at":"{stamp}","tax_amount":null}}'
        ).encode()
        record = (str(customer).encode(), value)
        recent = [*recent[-99:], record]
        yield record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--interval", type=int, default=2, help="sensor interval, seconds")
    add_engine_arguments(parser)
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    print(f"machine: {machine()}")
    print(
        f"load: {args.rate:,.0f} events/s for {args.duration:g} s; sensor every "
        f"{args.interval} s; Kafka, Postgres, dagster-daemon and its runs on this machine"
    )
    engine = engine_settings(args)
    extra = {"BILLING_SENSOR_INTERVAL_SECONDS": str(args.interval), **engine.pop("extra_env")}
    print(
        f"engine: {args.engine}, {args.lanes} lane(s)"
        + (f", {args.workers} worker(s)" if args.engine == "celery" else "")
    )
    with (
        pipeline_stack(customers=CUSTOMERS, extra_env=extra, **engine) as stack,
        dg.DagsterInstance.get() as instance,
        daemon(stack),
    ):
        producer = make_producer(stack.bootstrap)
        rng = random.Random(7)

        def write(batch: list[tuple[bytes, bytes]]) -> None:
            for key, value in batch:
                send_value(producer, stack.topic, key, value)
            producer.poll(0)

        def produce(count: int | None, duration: float | None) -> None:
            run_at_rate(
                lambda n: billing_events(n, rng),
                write,
                lambda _: "event",
                rate=args.rate,
                count=count,
                duration_s=duration,
            )
            producer.flush(60)

        produce(100, None)  # warm-up: the first tick, the first run
        warm = end_offsets(stack)
        wait_until(lambda: caught_up(stack, warm), timeout_s=300)
        measured_from = time.time()
        started = time.monotonic()
        produce(None, args.duration)
        produced_s = time.monotonic() - started
        ends = end_offsets(stack)
        drained = wait_until(lambda: caught_up(stack, ends), timeout_s=600)
        records = [
            r
            for r in instance.get_run_records(dg.RunsFilter(job_name="ingest_billing_events"))
            if r.create_timestamp.timestamp() >= measured_from - 1
        ]
        profile = step_profile(instance, [r.dagster_run.run_id for r in records])
        produced = (
            scan_table(stack.lake, RAW_TABLE)
            .filter(pl.col("kafka_offset") >= pl.col("kafka_partition").replace_strict(warm))
            .select(
                "kafka_partition",
                "kafka_offset",
                produced_s=pl.col("kafka_timestamp").dt.epoch("us") / 1e6,
            )
            .collect()
        )
        seconds = latencies(stack, produced)
    total = sum(ends.values()) - sum(warm.values())
    print(
        f"produced {total:,} events in {produced_s:.1f} s ({total / produced_s:,.0f}/s); "
        f"the pipeline drained {drained:.1f} s after the producer stopped"
    )
    print(f"production -> balance committed:  {percentiles(seconds)}")
    sizes = [int(r.dagster_run.tags.get("billing/records", 0)) for r in records]
    durations = [
        r.end_time - r.start_time for r in records if r.end_time is not None and r.start_time
    ]
    print(
        f"ingest runs: {len(records)}, records per run mean {statistics.fmean(sizes):,.0f} "
        f"(max {max(sizes):,}), run time mean {statistics.fmean(durations):.1f} s"
    )
    print_lane_overlap(records)
    print()
    print_profile(profile)


if __name__ == "__main__":
    main()
