"""End-to-end latency through CDC: OLTP commit -> Debezium -> Kafka -> ingest run ->
balance updated in Postgres.

Starts Apache Kafka, Postgres (OLTP, serving and Dagster storage databases) and Debezium in
Kafka Connect; the workload generator commits activities to the OLTP tables at --rate for
--duration seconds while the project's own sensor and ingest job run every --interval
seconds (the sensor's default is 5 s), in process, as the daemon would run them.

For every money row it prints, as p50 / p95 / p99 / max:
  - commit -> in Kafka      (Debezium: WAL decoding, Connect's producer)
  - commit -> balance       (the whole path; the row's transaction_history entry, written
                             in the same Postgres transaction as its balance)

    .venv/bin/python bench/cdc_latency.py --rate 100 --duration 60
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import dagster as dg
from confluent_kafka import Consumer, TopicPartition
from harness import percentiles
from machine_info import machine  # bench/ is the script folder, so on sys.path

from billing_dagster.definitions import build_definitions, build_resources
from billing_dagster.enrichment import write_reference_data
from billing_dagster.kafka_io import ensure_topic
from billing_dagster.local_infra.debezium import LocalDebezium
from billing_dagster.local_infra.kafka import ApacheKafka
from billing_dagster.local_infra.postgres import LocalPostgres
from billing_dagster.oltp import connect_oltp, migrate_oltp, write_activities
from billing_dagster.postgres_db import connect, migrate
from billing_dagster.settings import load_settings
from billing_dagster.synthetic import SyntheticBillingStream
from billing_dagster.workload import PRIMARY_KEYS, BillingWorkload, run_at_rate

PARTITIONS = 24


class Clock:
    """When each money row was committed, seen in Kafka, and applied to a balance."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.committed: dict[str, float] = {}
        self.in_kafka: dict[str, float] = {}
        self.applied: dict[str, float] = {}

    def commit(self, ids: list[str], at: float) -> None:
        with self.lock:
            for event_id in ids:
                self.committed[event_id] = at

    def pending(self) -> list[str]:
        with self.lock:
            return [e for e in self.committed if e not in self.applied]


def write_and_time(url: str, clock: Clock, rate: float, duration: float) -> int:
    workload = BillingWorkload(seed=int(time.time()))
    with connect_oltp(url) as connection:

        def write(batch) -> None:
            for activity in batch:
                write_activities(connection, [activity])
                ids = [
                    str(c.values[PRIMARY_KEYS[c.table]])
                    for c in activity.changes
                    if c.op == "insert" and c.table in ("transactions", "payments", "refunds")
                ]
                clock.commit(ids, time.time())

        counts = run_at_rate(workload, write, rate=rate, duration_s=duration)
    return sum(counts.values())


def watch_kafka(bootstrap: str, topic: str, clock: Clock, stop: threading.Event) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    while not stop.is_set():
        for message in consumer.consume(1000, timeout=0.2):
            if message.error() or message.value() is None:
                continue
            seen = time.time()
            change = json.loads(message.value())
            table = (change.get("source") or {}).get("table")
            event_id = (change.get("after") or {}).get(PRIMARY_KEYS.get(table, ""))
            if event_id:
                with clock.lock:
                    clock.in_kafka.setdefault(event_id, seen)
    consumer.close()


def watch_balances(url: str, clock: Clock, stop: threading.Event) -> None:
    with connect(url) as connection:
        connection.autocommit = True
        while not stop.is_set():
            pending = clock.pending()
            if pending:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT event_id FROM transaction_history WHERE event_id = ANY(%s)",
                        (pending,),
                    )
                    seen = time.time()
                    with clock.lock:
                        for (event_id,) in cursor.fetchall():
                            clock.applied.setdefault(event_id, seen)
            time.sleep(0.1)


def run_pipeline(settings, interval: float, stop: threading.Event, runs: list[float]) -> None:
    """The sensor every `interval` seconds and its runs, in process (as the daemon would)."""
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def("kafka_offsets_sensor")
    job = defs.resolve_job_def("ingest_billing_events")
    resources = build_resources(settings)
    cursor = None
    with dg.instance_for_test() as instance:
        while not stop.is_set():
            tick = time.monotonic()
            context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
            result = sensor(context)
            requests = [] if isinstance(result, dg.SkipReason) else result.run_requests
            cursor = context.cursor if isinstance(result, dg.SkipReason) else result.cursor
            for request in requests or []:
                started = time.monotonic()
                job.execute_in_process(
                    run_config=request.run_config,
                    partition_key=request.partition_key,
                    instance=instance,
                    raise_on_error=True,
                )
                runs.append(time.monotonic() - started)
            stop.wait(max(0.0, interval - (time.monotonic() - tick)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=100.0, help="OLTP activities per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--interval", type=float, default=5.0, help="sensor interval, seconds")
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)  # the figures, not run logs
    print(f"machine: {machine()}")
    print(
        f"load: {args.rate:g} OLTP activities/s for {args.duration:g} s; sensor every "
        f"{args.interval:g} s; Kafka, Postgres, Debezium and the pipeline on this machine"
    )
    topic = "billing-cdc"
    with (
        ApacheKafka(heap="1g") as kafka,
        LocalPostgres(database="dagster") as postgres,
        tempfile.TemporaryDirectory() as lake_dir,
    ):
        oltp_url = postgres.create_database("billing_oltp")
        serving_url = postgres.create_database("billing")
        migrate_oltp(oltp_url)
        migrate(serving_url)
        ensure_topic(kafka.bootstrap_servers, topic, partitions=PARTITIONS)
        settings = load_settings(
            {
                "BILLING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "BILLING_TOPIC": topic,
                "BILLING_TOPIC_FORMATS": f"{topic}=debezium-json",
                "BILLING_LAKE_ROOT": str(Path(lake_dir) / "lake"),
                "BILLING_POSTGRES_URL": serving_url,
                "BILLING_OLTP_URL": oltp_url,
            }
        )
        lake = build_resources(settings)["lake"].location()
        write_reference_data(lake, SyntheticBillingStream().reference_data())
        with LocalDebezium(kafka.bootstrap_servers, oltp_url, topic):
            clock, stop, runs = Clock(), threading.Event(), []
            threads = [
                threading.Thread(
                    target=watch_kafka, args=(kafka.bootstrap_servers, topic, clock, stop)
                ),
                threading.Thread(target=watch_balances, args=(serving_url, clock, stop)),
                threading.Thread(target=run_pipeline, args=(settings, args.interval, stop, runs)),
            ]
            for thread in threads:
                thread.start()
            time.sleep(args.interval)  # the first sensor tick and run imports, warm
            activities = write_and_time(oltp_url, clock, args.rate, args.duration)
            deadline = time.monotonic() + 120
            while clock.pending() and time.monotonic() < deadline:
                time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join(timeout=120)

    committed = clock.committed
    to_kafka = [clock.in_kafka[e] - t for e, t in committed.items() if e in clock.in_kafka]
    to_balance = [clock.applied[e] - t for e, t in committed.items() if e in clock.applied]
    print(f"activities committed: {activities:,}; money rows: {len(committed):,}")
    print(f"commit -> in Kafka:  {percentiles(to_kafka)}")
    print(f"commit -> balance:   {percentiles(to_balance)}")
    print(f"ingest runs: {len(runs)}, mean {statistics.fmean(runs) if runs else 0:.2f} s each")
    missing = len(committed) - len(to_balance)
    print(f"rows never applied within 120 s of the end: {missing}")


if __name__ == "__main__":
    main()
