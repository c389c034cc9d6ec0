"""The Celery engine (issue 18): the run queue hands runs to warm Celery workers through
Redis (dev/celery/, docs/scaling.md).

- the instance made for engine "celery" has a CeleryRunLauncher, and the documented
  multi-host and Kubernetes configurations load or validate;
- against real Redis, Kafka, Postgres, a real `dagster-daemon` and two real workers (one
  set-up for the module): the sensor's runs execute on the workers exactly once; a worker
  SIGKILLed mid-run has its run failed by run monitoring and its offsets ingested again
  exactly once; a deploy restarts the workers gracefully while events flow.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
import yaml

from billing_dagster.contract import BILLING_EVENTS_TABLE, RAW_TABLE
from billing_dagster.delta_lake import committed_offsets, read_table
from billing_dagster.kafka_io import ensure_topic
from billing_dagster.local_infra.celery import WARM_IMPORTS, CeleryWorkers, worker_command
from billing_dagster.local_infra.dagster import dagster_daemon, write_instance_yaml
from billing_dagster.local_infra.process import REPO_ROOT
from billing_dagster.postgres_db import connect, migrate
from billing_dagster.serving import serving_marks
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream
from sensors.lane import ingest_runs_in_flight, ingests

from .conftest import Pipeline, operated_env
from .lake_rows import (
    balance_writes_held,
    balances,
    balances_not_matching_history,
    expected_balances,
    history_counts,
)
from .test_lane import wait_for, worker_pid
from .test_operations import Feed

CELERY_TASK_ID_TAG = "dagster-celery/task_id"
#: The lane's `dagster/max_runtime` here: run monitoring fails the run of a dead worker
#: after it (+ one 10 s poll); well above a run's few seconds (as in test_lane.py).
MAX_RUNTIME_S = 20
DOCS_DEPLOY = REPO_ROOT / "docs" / "deploy"


# ---- configuration ---------------------------------------------------------------------


def test_the_celery_instance_and_the_documented_deployments_load(
    postgres, redis, tmp_path, monkeypatch
):
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.launcher import DefaultRunLauncher
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_celery.cli import get_validated_config
    from dagster_celery.launcher import CeleryRunLauncher

    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres.create_database("dagster_celery_a"))
    monkeypatch.setenv("DAGSTER_CELERY_BROKER_URL", redis.url)
    base = (REPO_ROOT / "dev" / "dagster.yaml").read_text()

    celery_home = tmp_path / "celery"
    written = write_instance_yaml(celery_home, "celery").read_text()
    assert written.startswith(base.rstrip())  # dev/dagster.yaml itself, not a copy of it
    with dg.DagsterInstance.from_config(str(celery_home)) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, CeleryRunLauncher)
        assert (launcher.broker, launcher.backend) == (redis.url, redis.url)
        assert launcher.supports_check_run_worker_health and launcher.supports_resume_run
        # Everything else is the base instance's: the queue, the lane, run monitoring.
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_resume_run_attempts == 0
    with dg.DagsterInstance.from_config(
        str(write_instance_yaml(tmp_path / "default", "default").parent)
    ) as instance:
        assert isinstance(instance.run_launcher, DefaultRunLauncher)
    # The workers' side: the same broker and backend.
    worker = get_validated_config(str(REPO_ROOT / "dev" / "celery" / "worker.yaml"))
    assert (worker["broker"], worker["backend"]) == (redis.url, redis.url)

    # Kubernetes with a pod per run: dev/dagster.yaml + the K8sRunLauncher block is a valid
    # instance, and the block valid for K8sRunLauncher (no cluster needed to check).
    from dagster._config import validate_config
    from dagster_k8s.launcher import K8sRunLauncher

    block = (DOCS_DEPLOY / "k8s" / "run-launcher-k8s.yaml").read_text()
    k8s_home = tmp_path / "k8s"
    k8s_home.mkdir()
    (k8s_home / "dagster.yaml").write_text(f"{base.rstrip()}\n\n{block}")
    config, _ = dagster_instance_config(str(k8s_home))
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    checked = validate_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert checked.success, checked.errors

    # The documented worker commands (Kubernetes Deployment, systemd unit on a worker host)
    # are worker_command's: same app, config, queue and warm imports, then celery options.
    manifests = yaml.safe_load_all((DOCS_DEPLOY / "k8s" / "celery-workers.yaml").read_text())
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {e["secretRef"]["name"] for e in container["envFrom"]} == {"billing-dagster-env"}
    unit = (DOCS_DEPLOY / "hosts" / "billing-celery-worker@.service").read_text()
    (start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    for documented in (container["command"], shlex.split(start.removeprefix("ExecStart="))):
        value = {a: documented[i + 1] for i, a in enumerate(documented[:-1])}
        options = dict(a.split("=", 1) for a in documented[documented.index("--") + 1 :])
        command = worker_command(
            value["--name"],
            concurrency=int(options["--concurrency"]),
            pidfile=Path(options["--pidfile"]),
            config=Path(value["--config-yaml"]),
        )
        assert [Path(documented[0]).name, *documented[1:]] == ["dagster-celery", *command[1:]]
    assert set(WARM_IMPORTS) <= set(container["command"])


# ---- the engine under a real daemon ------------------------------------------------------


@dataclass
class Engine:
    pipeline: Pipeline
    instance: dg.DagsterInstance
    workers: CeleryWorkers
    produced: list[GeneratedRecord] = field(default_factory=list)

    def produce(self, records: list[GeneratedRecord]) -> None:
        self.pipeline.produce(records)
        self.produced += records

    def lane_runs(self) -> list[dg.RunRecord]:
        return [r for r in self.instance.get_run_records() if ingests(r.dagster_run)]

    def record(self, run_id: str) -> dg.RunRecord:
        return self.instance.get_run_record_by_id(run_id)


@pytest.fixture(scope="module")
def engine(kafka, postgres, redis, tmp_path_factory) -> Iterator[Engine]:
    """One topic, lake, serving database and Dagster home for the module; a real
    dagster-daemon (sensor, run queue, run monitoring, retries) launching runs onto two
    Celery workers (as many pool processes as the queue may have runs in flight)."""
    root = tmp_path_factory.mktemp("celery_engine")
    topic = f"billing-events-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka.bootstrap_servers, topic, partitions=24, timestamp_type="CreateTime")
    serving_url = postgres.create_database(f"serving_{uuid.uuid4().hex[:10]}")
    migrate(serving_url)  # so each test can hold its tables from the start
    home = root / "dagster_home"
    env = operated_env(
        kafka,
        topic,
        str(root / "lake"),
        serving_url,
        postgres,
        home,
        DAGSTER_CELERY_BROKER_URL=redis.url,
        BILLING_LANE_MAX_RUNTIME_SECONDS=str(MAX_RUNTIME_S),
        # Two lanes: their runs go to the workers side by side.
        BILLING_INGEST_LANES="2",
    )
    write_instance_yaml(home, "celery")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():  # this process reads the same instance
            patch.setenv(name, value)
        pipeline = Pipeline(env)
        # Creates the run storage's tables before the daemon and the workers race to.
        instance = dg.DagsterInstance.from_config(str(home))
        workers = CeleryWorkers(env, count=2, workdir=root / "workers")
        log = root / "daemon.log"
        try:
            with dagster_daemon(env, log) as daemon, workers:
                yield Engine(pipeline, instance, workers)
                # The daemon's shutdown (~10 s) overlaps the workers' (ours, on leaving).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.pid, signal.SIGTERM)
        finally:
            instance.dispose()
            print("daemon:", log.read_text()[-3000:])
            print(workers.logs())


def caught_up(engine: Engine) -> bool:
    """Every offset of the topic in raw/ and in Postgres, and no ingest run in flight."""
    settings = engine.pipeline.settings
    with engine.pipeline.client() as client:
        marks = client.watermarks(settings.topic)
    lake = committed_offsets(engine.pipeline.lake.open(RAW_TABLE), settings.topic, list(marks))
    serving = serving_marks(settings.postgres_url, settings.topic)
    return all(
        lake[p] == end and serving.get(p) == end for p, (_, end) in marks.items() if end
    ) and not ingest_runs_in_flight(engine.instance)


def assert_exactly_once(engine: Engine) -> None:
    lake = engine.pipeline.lake
    for table in (RAW_TABLE, BILLING_EVENTS_TABLE):
        frame = read_table(lake, table)
        assert frame.select("kafka_partition", "kafka_offset").n_unique() == frame.height, table
    events = read_table(lake, BILLING_EVENTS_TABLE)
    assert events["event_id"].n_unique() == events.height
    url = engine.pipeline.settings.postgres_url
    assert history_counts(url) == (events.height, events.height)
    assert balances_not_matching_history(url) == []
    reference = SyntheticBillingStream().reference_data()
    assert balances(url) == expected_balances(engine.produced, reference)


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def executed_on(engine: Engine, run_id: str) -> int:
    """The pid of the pool process that ran the run, after checking the run went through
    Celery: launched as a task by CeleryRunLauncher, which a worker ran successfully."""
    run = engine.record(run_id).dagster_run
    task_id = run.tags[CELERY_TASK_ID_TAG]
    events = engine.instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    forwarded = "[CeleryRunLauncher] Celery task has been forwarded to the broker."
    assert any(e.message == forwarded for e in events)
    logs = "".join(w.log.read_text() for w in engine.workers.every_worker())
    assert f"Task execute_job[{task_id}] succeeded" in logs
    pid = worker_pid(engine.instance, run_id)
    assert pid is not None
    return pid


def waiting_on_lock(url: str) -> bool:
    database = url.rsplit("/", 1)[1]
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (database,),
        )
        return cursor.fetchone()[0] > 0


def blocked_run(engine: Engine) -> tuple[dg.DagsterRun, int]:
    """A started ingest run, its pool process, once it waits on the held balances."""
    url = engine.pipeline.settings.postgres_url
    return wait_for(
        "an ingest run waiting to write balances",
        lambda: next(
            (
                (r.dagster_run, pid)
                for r in engine.lane_runs()
                if r.dagster_run.status == dg.DagsterRunStatus.STARTED
                and (pid := worker_pid(engine.instance, r.dagster_run.run_id))
                and waiting_on_lock(url)
            ),
            None,
        ),
        timeout_s=180,
    )


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie (its parent died with it; init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in {"Z", "X"}


def records(seed: int, count: int) -> list[GeneratedRecord]:
    # The default stream: duplicate deliveries and malformed records included.
    return list(SyntheticBillingStream(seed=seed).records(count))


def test_sensor_runs_execute_on_warm_celery_workers_exactly_once(engine: Engine):
    # Warm: before any run, every pool process has the heavy native libraries loaded
    # (imported by the worker's main process, then forked).
    workers = engine.workers
    pools = {pid for w in workers.workers.values() for pid in w.pool_pids()}
    assert len(pools) == len(workers.workers) * workers.concurrency
    for pid in pools:
        assert "_polars_runtime" in mapped(pid) and "/deltalake/_internal" in mapped(pid)

    engine.produce(records(61, 300))
    wait_for("the sensor's runs to ingest everything", lambda: caught_up(engine), timeout_s=240)

    runs = engine.lane_runs()
    assert runs and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    for run in runs:
        # In a pool process that existed, warm, before the run was launched.
        assert executed_on(engine, run.dagster_run.run_id) in pools
    # Lanes in parallel: both lanes had runs, and two of them ran at the same time.
    assert {r.dagster_run.tags["billing/lane"] for r in runs} == {"0/2", "1/2"}
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    assert_exactly_once(engine)


def test_a_worker_killed_mid_run_has_its_run_failed_and_its_offsets_ingested_once(
    engine: Engine,
):
    url = engine.pipeline.settings.postgres_url
    with balance_writes_held(url):
        engine.produce(records(62, 400))
        run, pid = blocked_run(engine)
        assert run.tags["dagster/max_runtime"] == str(MAX_RUNTIME_S)
        worker = engine.workers.worker_of(pid)
        assert worker is not None
        # The whole worker at once (a host or container lost): nothing is left to tell
        # Celery's result backend, whose task state stays STARTED.
        worker.kill()
        killed_at = time.monotonic()
        wait_for("the run's process to die", lambda: gone(pid), timeout_s=30)
        assert engine.record(run.run_id).dagster_run.status == dg.DagsterRunStatus.STARTED

    failed = wait_for(
        "run monitoring to fail the dead worker's run",
        lambda: (r := engine.record(run.run_id)).dagster_run.is_finished and r,
        timeout_s=MAX_RUNTIME_S + 120,
    )
    detected_s = time.monotonic() - killed_at
    started = failed.end_time - failed.start_time
    print(
        f"dead worker's run failed {detected_s:.1f}s after the kill, "
        f"{started:.1f}s after it started"
    )
    assert failed.dagster_run.status == dg.DagsterRunStatus.FAILURE
    canceling = engine.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_CANCELING)
    assert any(
        f"maximum runtime of {MAX_RUNTIME_S} seconds" in (e.message or "") for e in canceling
    )

    wait_for("its offsets to be ingested again", lambda: caught_up(engine), timeout_s=240)
    later = [
        r
        for r in engine.lane_runs()
        if r.create_timestamp > failed.create_timestamp
        and r.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    ]
    # Taken by the worker still alive (the next test's deploy replaces both).
    assert later and all(
        engine.workers.worker_of(executed_on(engine, r.dagster_run.run_id)) not in (None, worker)
        for r in later
    )
    assert_exactly_once(engine)


def test_a_deploy_restarts_the_workers_gracefully_while_events_flow(engine: Engine):
    workers = engine.workers
    url = engine.pipeline.settings.postgres_url
    with Feed(engine.pipeline, SyntheticBillingStream(seed=63)) as feed:
        with balance_writes_held(url):
            run, pid = blocked_run(engine)
            busy = workers.worker_of(pid)
            assert busy is not None
            # The busy worker first: its warm shutdown must wait for the run, not kill it.
            order = sorted(workers.workers, key=lambda slot: workers[slot] is not busy)
            deploy = threading.Thread(target=workers.restart, args=(order,), daemon=True)
            deploy.start()
            wait_for(
                "the busy worker's warm shutdown", lambda: "Warm shutdown" in busy.log.read_text()
            )
            assert not gone(pid)
        deploy.join(timeout=600)
        assert not deploy.is_alive()
        assert all(old.group() is None for old in workers.retired)
        finished = engine.record(run.run_id)
        assert finished.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        failures = engine.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert failures == []  # not failed and then finished anyway
        restarted_at = time.time()
        # Events keep coming: the new workers take the next runs.
        later = wait_for(
            "a run after the deploy",
            lambda: next(
                (
                    r
                    for r in engine.lane_runs()
                    if r.create_timestamp.timestamp() > restarted_at
                    and r.dagster_run.status == dg.DagsterRunStatus.SUCCESS
                ),
                None,
            ),
            timeout_s=180,
        )
        ran = executed_on(engine, later.dagster_run.run_id)
        assert workers.worker_of(ran) in workers.workers.values()
    engine.produced += feed.produced

    wait_for("everything ingested", lambda: caught_up(engine), timeout_s=240)
    since = [r for r in engine.lane_runs() if r.create_timestamp >= finished.create_timestamp]
    # Graceful: no run failed, was retried or was lost while the workers were replaced.
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in since)
    assert not [r for r in since if "dagster/parent_run_id" in r.dagster_run.tags]
    assert_exactly_once(engine)
