"""Catch-up throughput, measured beside its ceilings and a per-message baseline.

N synthetic events are put in Kafka first (24 partitions, 1% duplicate deliveries,
--invalid-rate malformed). Then, in one run of this script, on the same topic:

  1. raw consume ceiling: confluent-kafka consume-and-discard of every record;
  2. the pipeline as in production: `dagster-daemon` with this workspace (the sensor, the
     run queue of dev/dagster.yaml, one run process per micro-batch) until every offset is
     in raw/, billing_events/, the Postgres balances and the revenue aggregates;
  3. plain Delta append ceiling: the accepted rows the pipeline wrote, appended again to a
     fresh table in one write_deltalake call, partitioned the same way;
  4. the per-message baseline consumer (bench/baseline_consumer.py) on the same records,
     into its own Postgres database and lake.

It prints events/s for each, the pipeline's ratios to them, and the profile of the runs
(queueing, launch, each step) from Dagster's event log.

    .venv/bin/python bench/catch_up.py --events 2000000
"""

from __future__ import annotations

import argparse
import logging
import time

import dagster as dg
import polars as pl
from baseline_consumer import run_baseline
from confluent_kafka import Consumer, TopicPartition
from deltalake import write_deltalake
from harness import (
    PARTITIONS,
    add_engine_arguments,
    caught_up,
    daemon,
    end_offsets,
    engine_settings,
    pipeline_stack,
    print_lane_overlap,
    print_profile,
    step_profile,
    wait_until,
)
from machine_info import machine  # bench/ is the script folder, so on sys.path

from billing_dagster.contract import BILLING_EVENTS_TABLE, EVENT_HOUR_PARTITIONS
from billing_dagster.delta_lake import LakeLocation, read_table
from billing_dagster.enrichment import load_reference_data
from billing_dagster.postgres_db import migrate
from billing_dagster.producer import make_producer, produce_records
from billing_dagster.synthetic import SyntheticBillingStream
from sensors.kafka_offsets import WAITING_OR_RUNNING


def raw_consume(bootstrap: str, topic: str, count: int) -> float:
    """Seconds to consume-and-discard `count` records with confluent-kafka."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-raw-consume",
            "enable.auto.commit": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    seen = 0
    started = time.perf_counter()
    while seen < count:
        seen += sum(1 for m in consumer.consume(num_messages=20_000, timeout=1.0) if not m.error())
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--invalid-rate", type=float, default=0.0001)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument(
        "--max-records-per-run", type=int, default=None, help="BILLING_MAX_RECORDS_PER_RUN"
    )
    parser.add_argument("--baseline-events", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--skip-baseline", action="store_true", help="skip figures 3 and 4")
    add_engine_arguments(parser)
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    print(f"machine: {machine()}")
    print(
        f"events: {args.events:,} in 24 partitions, invalid rate {args.invalid_rate:.2%}, "
        f"{args.customers:,} customers; Kafka, Postgres and Dagster on this machine"
    )
    engine = engine_settings(args)
    extra = dict(engine.pop("extra_env"))
    if args.max_records_per_run:
        extra["BILLING_MAX_RECORDS_PER_RUN"] = str(args.max_records_per_run)
    print(
        f"engine: {args.engine}, {args.lanes} lane(s), "
        + (f"{args.workers} worker(s)" if args.engine == "celery" else "")
    )
    with pipeline_stack(customers=args.customers, extra_env=extra, **engine) as stack:
        stream = SyntheticBillingStream(
            seed=1, invalid_rate=args.invalid_rate, customers=args.customers
        )
        started = time.perf_counter()
        produce_records(make_producer(stack.bootstrap), stack.topic, stream.records(args.events))
        print(f"setup: produced at {args.events / (time.perf_counter() - started):,.0f} events/s")
        ends = end_offsets(stack)

        consume_s = raw_consume(stack.bootstrap, stack.topic, args.events)
        raw_rate = args.events / consume_s
        print(f"1. raw consume ceiling:  {raw_rate:12,.0f} events/s ({consume_s:.1f} s)")

        with dg.DagsterInstance.get() as instance, daemon(stack):
            started = time.monotonic()
            waited = wait_until(
                lambda: (
                    caught_up(stack, ends)
                    and not instance.get_runs_count(dg.RunsFilter(statuses=WAITING_OR_RUNNING))
                ),
                timeout_s=args.timeout,
            )
            every = instance.get_run_records(dg.RunsFilter())
            records = [r for r in every if r.dagster_run.job_name == "ingest_billing_events"]
            refreshes = [r for r in every if r.dagster_run.job_name == "refresh_revenue"]
            failed = [r for r in records if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]
            first_launch = min(r.create_timestamp.timestamp() for r in records)
            # Until the last run of either kind ended: the aggregates caught up too.
            last_end = max(r.end_time for r in every if r.end_time)
            busy = last_end - first_launch
            profile = step_profile(instance, [r.dagster_run.run_id for r in records])
        pipeline_rate = args.events / busy
        print(
            f"2. pipeline catch-up:    {pipeline_rate:12,.0f} events/s ({busy:.1f} s from the "
            f"first run request to the last run's end; {len(records)} runs, {len(failed)} "
            f"not successful; {args.events / waited:,.0f} events/s counting the daemon's "
            f"start-up, {waited:.1f} s)"
        )

        print()
        print(
            f"profile of {len(records)} ingest runs (BILLING_MAX_RECORDS_PER_RUN "
            f"{extra.get('BILLING_MAX_RECORDS_PER_RUN', 'default')}):"
        )
        print_profile(profile)
        sizes = pl.Series([int(r.dagster_run.tags.get("billing/records", 0)) for r in records])
        print(f"records per run: mean {sizes.mean():,.0f}, max {sizes.max():,}")
        print(f"revenue refresh runs: {len(refreshes)}")
        print_lane_overlap(records)
        if args.skip_baseline:
            return

        accepted = read_table(stack.lake, BILLING_EVENTS_TABLE)
        started = time.perf_counter()
        write_deltalake(
            str(stack.workdir / "plain_append"),
            accepted.to_arrow(),
            mode="append",
            partition_by=list(EVENT_HOUR_PARTITIONS),
        )
        append_s = time.perf_counter() - started
        append_rate = accepted.height / append_s
        print(
            f"3. plain Delta append:   {append_rate:12,.0f} rows/s ({accepted.height:,} "
            f"accepted rows in {append_s:.1f} s)"
        )

        baseline_url = stack.postgres.create_database("baseline")
        migrate(baseline_url)
        limit = min(args.baseline_events, args.events)
        baseline = run_baseline(
            stack.bootstrap,
            stack.topic,
            PARTITIONS,
            baseline_url,
            LakeLocation(str(stack.workdir / "baseline_lake")),
            load_reference_data(stack.lake),
            limit=limit,
        )
        print(
            f"4. per-message baseline: {baseline.rate:12,.0f} events/s ({baseline.messages:,} "
            f"events in {baseline.seconds:.1f} s: {baseline.accepted:,} accepted, "
            f"{baseline.duplicates:,} duplicates, {baseline.quarantined:,} quarantined)"
        )

        print()
        print(f"pipeline / raw consume:  {pipeline_rate / raw_rate:6.2f}")
        print(f"pipeline / baseline:     {pipeline_rate / baseline.rate:6.1f}x")


if __name__ == "__main__":
    main()
