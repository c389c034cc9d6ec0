"""The zero-configuration demo: embedded broker, Postgres, a local lake, a producer and
`dagster dev` with this workspace, all on loopback, stopped together.

Runs execute on the Celery engine (docs/scaling.md): Redis and warm Celery workers
(BILLING_DEMO_CELERY_WORKERS, default 2) beside `dagster dev`. BILLING_DEMO_ENGINE=default
runs them as `dagster dev` alone does, a process per run.

Sources of events: `synthetic` (billing events with duplicate deliveries and malformed
records, straight to Kafka), `workload` (the billing workload generator's events straight
to Kafka), or `cdc` (the generator writes the OLTP tables, Debezium captures them into
Kafka; needs Apache Kafka and Java).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from billing_dagster.delta_lake import LakeLocation
from billing_dagster.enrichment import write_reference_data
from billing_dagster.kafka_io import ensure_topic
from billing_dagster.local_infra.celery import CeleryWorkers
from billing_dagster.local_infra.dagster import ENGINES, stop_process_group, write_instance_yaml
from billing_dagster.local_infra.debezium import LocalDebezium
from billing_dagster.local_infra.kafka import ApacheKafka
from billing_dagster.local_infra.postgres import LocalPostgres
from billing_dagster.local_infra.process import REPO_ROOT, InfraError, port_open, stop_on_sigterm
from billing_dagster.local_infra.redis import LocalRedis
from billing_dagster.local_infra.tansu import TansuBroker
from billing_dagster.oltp import connect_oltp, migrate_oltp, write_activities
from billing_dagster.postgres_db import migrate
from billing_dagster.producer import billing_event_writer, make_producer, produce_at_rate
from billing_dagster.synthetic import SyntheticBillingStream
from billing_dagster.workload import BillingWorkload, run_at_rate

CDC_TOPIC = "billing-cdc"


def start_broker(kind: str) -> ApacheKafka | TansuBroker:
    if kind == "tansu":
        return TansuBroker().start()
    if kind == "kafka":
        return ApacheKafka().start()
    raise InfraError(f"BILLING_DEMO_BROKER must be tansu or kafka, got '{kind}'")


def run_demo(
    *,
    state_dir: Path,
    ui_port: int,
    broker_kind: str,
    rate: float,
    topic: str,
    for_seconds: float | None,
    source: str = "synthetic",
    echo=print,
    engine: str | None = None,
    celery_workers: int | None = None,
) -> int:
    engine, celery_workers = _engine_choice(engine, celery_workers)
    if source == "cdc" and broker_kind != "kafka":
        raise InfraError("--source cdc needs --broker kafka: Debezium runs in Kafka Connect")
    if source == "cdc":
        topic = CDC_TOPIC  # the three money tables' changes, routed to one topic
    if port_open(ui_port):
        raise InfraError(f"port {ui_port} is in use: pass --port to choose another for the UI")
    # The embedded broker keeps nothing across restarts, so neither may the lake: stale
    # offsets in the lake would make new records look processed.
    shutil.rmtree(state_dir, ignore_errors=True)
    dagster_home = state_dir / "dagster_home"
    dagster_home.mkdir(parents=True)
    write_instance_yaml(dagster_home, engine)
    lake_root = state_dir / "lake"

    stop = threading.Event()
    # A plain SIGTERM would skip the clean-up below and leave servers running.
    stop_on_sigterm()
    with ExitStack() as stack:
        echo(f"starting the {broker_kind} broker ...")
        broker = start_broker(broker_kind)
        stack.callback(broker.stop)
        echo(f"  broker on {broker.bootstrap_servers}")
        echo("starting Postgres (Dagster's storage and the serving tables) ...")
        postgres = LocalPostgres(database="dagster").start()
        stack.callback(postgres.stop)
        serving_url = postgres.create_database("billing")
        migrate(serving_url)
        echo(f"  Dagster storage {postgres.url}; balances in {serving_url}")
        ensure_topic(broker.bootstrap_servers, topic, partitions=24)

        seed = int(time.time())
        # Customers, plans and FX rates the events are enriched from (same customer ids
        # for the synthetic stream and the workload generator).
        write_reference_data(
            LakeLocation(str(lake_root)), SyntheticBillingStream(seed=seed).reference_data()
        )
        echo(f"  reference data in {lake_root}/reference")
        extra_env: dict[str, str] = {}
        if source == "cdc":
            oltp_url = postgres.create_database("billing_oltp")
            migrate_oltp(oltp_url)
            echo(f"starting Debezium (Kafka Connect) on the OLTP database {oltp_url} ...")
            cdc = LocalDebezium(broker.bootstrap_servers, oltp_url, topic).start()
            stack.callback(cdc.stop)
            echo(f"  connector status: {cdc.status_url}")
            extra_env = {
                "BILLING_TOPIC_FORMATS": f"{topic}=debezium-json",
                "BILLING_OLTP_URL": oltp_url,
                "BILLING_CDC_STATUS_URL": cdc.status_url,
            }
        producing = threading.Thread(
            target=_feed,
            args=(
                source,
                broker,
                topic,
                seed,
                rate,
                stop.is_set,
                extra_env.get("BILLING_OLTP_URL"),
            ),
            daemon=True,
        )
        producing.start()
        stack.callback(stop.set)
        echo(f"source {source}: ~{rate:g}/s into '{topic}' (24 partitions)")

        env = {
            **os.environ,
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_POSTGRES_URL": postgres.url,
            "BILLING_POSTGRES_URL": serving_url,
            "BILLING_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "BILLING_TOPIC": topic,
            "BILLING_LAKE_ROOT": str(lake_root),
            **extra_env,
        }
        if engine == "celery":
            echo("starting Redis (the Celery broker) ...")
            redis = LocalRedis().start()
            stack.callback(redis.stop)
            env["DAGSTER_CELERY_BROKER_URL"] = redis.url
            echo(f"  Celery broker on {redis.url}")
            # Dagster's storage tables first, here: `dagster dev` and the workers would
            # otherwise race to create them on the fresh database ("already exists").
            _create_dagster_storage(dagster_home, env)
        ui = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-w",
                str(REPO_ROOT / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(ui_port),
            ],
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
        stack.callback(stop_process_group, ui)
        if engine == "celery":
            # After `dagster dev` is on its way: both take a while to import, and a run
            # launched before the workers are ready waits in Redis.
            workers = CeleryWorkers(env, count=celery_workers, workdir=state_dir / "celery")
            stack.callback(workers.stop)
            echo(f"starting {celery_workers} Celery workers ({workers.concurrency} runs each) ...")
            workers.start()
            echo(f"  Celery workers ready; logs in {workers.workdir}")
        echo(f"Dagster UI: http://127.0.0.1:{ui_port}  (lake: {lake_root}; Ctrl-C stops all)")
        deadline = None if for_seconds is None else time.monotonic() + for_seconds
        try:
            while ui.poll() is None:
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            echo("stopping ...")
        return 0 if ui.poll() in (None, 0, -signal.SIGTERM) else ui.returncode


def _engine_choice(engine: str | None, workers: int | None) -> tuple[str, int]:
    """The run engine and worker count: arguments, else BILLING_DEMO_ENGINE (celery or
    default) and BILLING_DEMO_CELERY_WORKERS (default 2)."""
    engine = (engine or os.environ.get("BILLING_DEMO_ENGINE", "").strip() or "celery").lower()
    if engine not in ENGINES:
        raise InfraError(f"BILLING_DEMO_ENGINE must be one of {', '.join(ENGINES)}, got '{engine}'")
    if workers is None:
        raw = os.environ.get("BILLING_DEMO_CELERY_WORKERS", "").strip() or "2"
        if not raw.isdigit() or int(raw) < 1:
            raise InfraError(
                f"BILLING_DEMO_CELERY_WORKERS must be a whole number >= 1, got '{raw}'"
            )
        workers = int(raw)
    return engine, workers


def _feed(
    source: str,
    broker: ApacheKafka | TansuBroker,
    topic: str,
    seed: int,
    rate: float,
    should_stop,
    oltp_url: str | None,
) -> None:
    """Keep events coming until the demo stops."""
    if source == "synthetic":
        producer = make_producer(
            broker.bootstrap_servers, single_record_batches=broker.kind == "tansu"
        )
        stream = SyntheticBillingStream(seed=seed)
        produce_at_rate(producer, topic, stream, rate=rate, should_stop=should_stop)
        return
    workload = BillingWorkload(seed=seed)
    if source == "cdc":
        assert oltp_url is not None
        with connect_oltp(oltp_url) as connection:
            run_at_rate(
                workload,
                lambda batch: write_activities(connection, batch),
                rate=rate,
                should_stop=should_stop,
            )
        return
    producer = make_producer(broker.bootstrap_servers, single_record_batches=broker.kind == "tansu")
    run_at_rate(workload, billing_event_writer(producer, topic), rate=rate, should_stop=should_stop)
    producer.flush(30)


def _create_dagster_storage(home: Path, env: dict[str, str]) -> None:
    """Open the instance once (its Postgres storage creates its tables), in a child
    process with the demo's environment, before the processes that share it start."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import dagster as dg; dg.DagsterInstance.from_config({str(home)!r}).dispose()",
        ],
        env={**os.environ, **env, "DAGSTER_HOME": str(home)},
        check=True,
        timeout=120,
    )
