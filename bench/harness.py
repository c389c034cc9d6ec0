"""The production set-up on one machine, for the catch-up and steady-state benchmarks:
Apache Kafka, Postgres (Dagster storage and serving), a local lake and `dagster-daemon`
serving this repository's workspace, with the run queue of `dev/dagster.yaml`.

The benchmarks read their figures from the places the pipeline writes: the lake's
committed offsets, the serving ledger (`balance_batches`, with the time each batch's
balances were committed) and Dagster's event log (the step profile).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from billing_dagster.aggregates import AGGREGATE_TABLES, reflected_version
from billing_dagster.contract import BILLING_EVENTS_TABLE, RAW_TABLE
from billing_dagster.delta_lake import LakeLocation, committed_offsets
from billing_dagster.enrichment import write_reference_data
from billing_dagster.kafka_io import KafkaClient, KafkaSettings, ensure_topic
from billing_dagster.local_infra.celery import BROKER_URL_ENV, CeleryWorkers, pool_size
from billing_dagster.local_infra.dagster import ENGINES, dagster_daemon, write_instance_yaml
from billing_dagster.local_infra.kafka import ApacheKafka
from billing_dagster.local_infra.postgres import LocalPostgres
from billing_dagster.local_infra.redis import LocalRedis
from billing_dagster.postgres_db import connect, migrate
from billing_dagster.synthetic import SyntheticBillingStream

PARTITIONS = 24


@dataclass
class Stack:
    bootstrap: str
    topic: str
    lake: LakeLocation
    serving_url: str
    dagster_url: str
    postgres: LocalPostgres
    home: Path
    workdir: Path
    env: dict[str, str]


def add_engine_arguments(parser) -> None:
    """--engine, --lanes, --workers, --concurrency: how the benchmark's runs execute."""
    parser.add_argument("--engine", choices=ENGINES, default="celery")
    parser.add_argument("--lanes", type=int, default=2, help="BILLING_INGEST_LANES")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="runs per Celery worker (default: enough "
        "pool processes for the run queue's max_concurrent_runs)",
    )


def engine_settings(args) -> dict[str, object]:
    return {
        "engine": args.engine,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "extra_env": {"BILLING_INGEST_LANES": str(args.lanes)},
    }


@contextmanager
def pipeline_stack(
    *,
    customers: int = 5_000,
    extra_env: dict[str, str] | None = None,
    engine: str = "celery",
    workers: int = 2,
    concurrency: int | None = None,
) -> Iterator[Stack]:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        kafka = stack.enter_context(ApacheKafka(heap="1g"))
        postgres = stack.enter_context(LocalPostgres(database="dagster"))
        serving_url = postgres.create_database("billing")
        migrate(serving_url)
        topic = "billing-events"
        ensure_topic(kafka.bootstrap_servers, topic, partitions=PARTITIONS)
        lake = LakeLocation(str(workdir / "lake"))
        write_reference_data(lake, SyntheticBillingStream(customers=customers).reference_data())
        home = workdir / "dagster_home"
        write_instance_yaml(home, engine)
        engine_env = {}
        if engine == "celery":
            redis = stack.enter_context(LocalRedis())
            engine_env[BROKER_URL_ENV] = redis.url
        env = {
            "DAGSTER_HOME": str(home),
            "DAGSTER_POSTGRES_URL": postgres.url,
            "BILLING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "BILLING_TOPIC": topic,
            "BILLING_LAKE_ROOT": lake.root,
            "BILLING_POSTGRES_URL": serving_url,
            "BILLING_START_FROM": "earliest",
            **engine_env,
            **(extra_env or {}),
        }
        # This process reads Dagster's instance (the step profile) with the same settings.
        os.environ.update(env)
        if engine == "celery":
            stack.enter_context(
                CeleryWorkers(
                    env,
                    count=workers,
                    concurrency=concurrency or pool_size(workers),
                    workdir=workdir / "celery",
                )
            )
        yield Stack(
            kafka.bootstrap_servers,
            topic,
            lake,
            serving_url,
            postgres.url,
            postgres,
            home,
            workdir,
            env,
        )


def daemon(stack: Stack):
    """`dagster-daemon` on the workspace: the sensor, the run queue and run processes."""
    return dagster_daemon(stack.env, stack.workdir / "daemon.log")


def end_offsets(stack: Stack) -> dict[int, int]:
    with KafkaClient(KafkaSettings(stack.bootstrap, consumer_group="bench-probe")) as client:
        return client.end_offsets(stack.topic)


def lake_offsets(stack: Stack) -> dict[int, int | None]:
    table = stack.lake.open(RAW_TABLE)
    return committed_offsets(table, stack.topic, list(range(PARTITIONS)))


def balance_offsets(stack: Stack) -> dict[int, int]:
    with connect(stack.serving_url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT kafka_partition, next_offset FROM balance_offsets WHERE topic = %s",
            (stack.topic,),
        )
        return dict(cursor.fetchall())


def aggregates_caught_up(stack: Stack) -> bool:
    """The revenue aggregates reflect the newest billing_events version."""
    source = stack.lake.open(BILLING_EVENTS_TABLE)
    if source is None:
        return False
    version = source.version()
    return all(reflected_version(stack.lake, table) == version for table in AGGREGATE_TABLES)


def caught_up(stack: Stack, ends: dict[int, int]) -> bool:
    """Every offset is in the lake and in the balances, and the aggregates reflect it."""
    lake = lake_offsets(stack)
    balances = balance_offsets(stack)
    return all(
        (lake.get(p) or 0) >= end and balances.get(p, 0) >= end for p, end in ends.items() if end
    ) and aggregates_caught_up(stack)


def wait_until(predicate, timeout_s: float, every_s: float = 1.0) -> float:
    """Seconds until predicate() held; raises after timeout_s."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not done within {timeout_s:.0f} s")
        time.sleep(every_s)
    return time.monotonic() - started


def ledger(stack: Stack) -> pl.DataFrame:
    """One row per (batch, partition range): when the balances holding it were committed."""
    with connect(stack.serving_url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT (r->>'partition')::int, (r->>'start')::bigint, (r->>'end')::bigint, "
            "extract(epoch FROM applied_at)::float8, run_id "
            "FROM balance_batches, jsonb_array_elements(offset_ranges) AS r WHERE topic = %s",
            (stack.topic,),
        )
        rows = cursor.fetchall()
    return pl.DataFrame(
        rows,
        schema={
            "kafka_partition": pl.Int32,
            "start": pl.Int64,
            "end": pl.Int64,
            "applied_s": pl.Float64,
            "run_id": pl.String,
        },
        orient="row",
    )


def latencies(stack: Stack, produced: pl.DataFrame) -> pl.Series:
    """Seconds from each record's production (its Kafka CreateTime) to the commit of the
    balances holding it. `produced`: kafka_partition, kafka_offset, produced_s."""
    ranges = ledger(stack).sort("start")
    matched = produced.sort("kafka_offset").join_asof(
        ranges,
        left_on="kafka_offset",
        right_on="start",
        by="kafka_partition",
        strategy="backward",
    )
    applied = matched.filter(pl.col("kafka_offset") < pl.col("end"))
    return applied["applied_s"] - applied["produced_s"]


def percentiles(values: list[float] | pl.Series) -> str:
    values = list(values)
    if len(values) < 2:
        return "n/a"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return (
        f"p50 {cuts[49]:6.2f} s   p95 {cuts[94]:6.2f} s   p99 {cuts[98]:6.2f} s   "
        f"max {max(values):6.2f} s   (n={len(values):,})"
    )


def step_profile(instance, run_ids: list[str]) -> dict[str, list[float]]:
    """Seconds per phase of each run, from Dagster's event log: queue (created -> launched),
    launch (launched -> run process up), each step, and the run's own tail."""
    from dagster import DagsterEventType

    phases: dict[str, list[float]] = defaultdict(list)
    for run_id in run_ids:
        record = instance.get_run_record_by_id(run_id)
        events = instance.all_logs(run_id)
        starts: dict[str, float] = {}
        marks: dict[str, float] = {}
        for event in events:
            kind = event.dagster_event_type
            if kind in (DagsterEventType.RUN_STARTING, DagsterEventType.RUN_START):
                marks.setdefault(kind.value, event.timestamp)
            elif kind == DagsterEventType.RUN_SUCCESS:
                marks["end"] = event.timestamp
            elif kind == DagsterEventType.STEP_START:
                starts[event.step_key] = event.timestamp
            elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                phases[f"step {event.step_key}"].append(event.timestamp - starts[event.step_key])
            elif kind == DagsterEventType.ASSET_MATERIALIZATION:
                materialization = event.asset_materialization
                phase_seconds = materialization.metadata.get("phase_seconds")
                if phase_seconds is not None:
                    for phase, seconds in phase_seconds.value.items():
                        phases[f"  ingest: {phase}"].append(seconds)
        created = record.create_timestamp.timestamp()
        launched = marks.get(DagsterEventType.RUN_STARTING.value)
        started = marks.get(DagsterEventType.RUN_START.value)
        if launched and started:
            phases["queued (created -> launched)"].append(launched - created)
            phases["launch (launched -> run process up)"].append(started - launched)
        if started and "end" in marks:
            phases["run process (start -> success)"].append(marks["end"] - started)
    return phases


def print_profile(phases: dict[str, list[float]]) -> None:
    print(f"{'phase':58s} {'runs':>5s} {'mean s':>8s} {'total s':>8s}")
    for name, values in sorted(phases.items(), key=lambda item: -sum(item[1])):
        print(f"{name:58s} {len(values):5d} {statistics.fmean(values):8.2f} {sum(values):8.1f}")


def print_lane_overlap(records) -> None:
    """Per lane: runs and busy seconds; and how much of the time lanes ran side by side."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        if record.start_time and record.end_time:
            lane = record.dagster_run.tags.get("billing/lane", "?")
            spans[lane].append((record.start_time, record.end_time))
    if not spans:
        return
    edges = sorted((t, d) for runs in spans.values() for s, e in runs for t, d in ((s, 1), (e, -1)))
    running, last, parallel, busy = 0, edges[0][0], 0.0, 0.0
    for moment, change in edges:
        if running:
            busy += moment - last
        if running > 1:
            parallel += moment - last
        running += change
        last = moment
    for lane, runs in sorted(spans.items()):
        print(f"lane {lane:6s} {len(runs):4d} runs, {sum(e - s for s, e in runs):8.1f} s running")
    print(f"some lane running {busy:.1f} s; two or more lanes at once {parallel:.1f} s")
