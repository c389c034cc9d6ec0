"""The ingest lane (issue 17): one lane whatever launches a run, failed offsets retried, and
dead run workers noticed.

- in process, against real Kafka: a batch that fails for good is re-requested under a new
  run key, backing off, and raises "Ingest Run Failed" until a later run covers it;
- under a real `dagster-daemon` on a Postgres-backed instance made from dev/dagster.yaml:
  a Materialize launched as the UI launches it (GraphQL) queues behind the sensor's run and
  the sensor waits for it; a run whose worker died with its code server (the daemon's
  process group SIGKILLed) is failed by run monitoring and the lane is free again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pytest

from assets.ingest import INGEST_JOB
from billing_dagster.definitions import INGEST_CONCURRENCY_TAG
from billing_dagster.enrichment import write_reference_data
from billing_dagster.local_infra.dagster import dagster_daemon
from billing_dagster.local_infra.process import REPO_ROOT
from billing_dagster.offsets import hour_key
from billing_dagster.postgres_db import migrate
from billing_dagster.synthetic import SyntheticBillingStream
from sensors.lane import INGEST_ASSET_KEYS, ingests

from .conftest import Pipeline, operated_env, pipeline_env
from .lake_rows import balance_writes_held
from .test_alerts_sensor import AlertsSensor, notifications
from .test_ingest_kafka import evaluate_sensor, request_ranges

T = TypeVar("T")


def records(seed: int, count: int) -> list:
    return list(
        SyntheticBillingStream(seed=seed, invalid_rate=0.0, duplicate_rate=0.0).records(count)
    )


# ---- in process: re-requests of failed offsets ------------------------------------------


def test_a_batch_failing_for_good_is_rerequested_under_new_keys_backing_off_and_alerted(
    kafka, topic, lake_root, serving_url, endpoint
):
    env = pipeline_env(
        kafka, topic, lake_root, serving_url, BILLING_ALERT_WEBHOOK_URL=f"{endpoint.url}/hook"
    )
    # No reference data yet: every ingest run fails at once, and retrying cannot help.
    pipeline = Pipeline(env, write_reference=False)
    job = pipeline.defs.resolve_job_def(INGEST_JOB)

    def run(request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        return job.execute_in_process(
            run_config=request.run_config,
            partition_key=request.partition_key,
            tags={"dagster/run_key": request.run_key},
            instance=instance,
            raise_on_error=False,
        )

    with dg.instance_for_test() as instance:
        alerts = AlertsSensor(pipeline, instance)
        pipeline.produce(records(31, 50))
        (first,), cursor, _ = evaluate_sensor(pipeline, instance, None)
        failed = run(first)
        assert not failed.success
        assert "Ingest Run Failed" in alerts.tick()
        ((_, post, _),) = endpoint.posts
        assert failed.run_id in post["summary"] and "reference" in post["summary"].lower()
        notifications(endpoint)

        # The topic is quiet: the same offsets again, under a key Dagster has not seen.
        (second,), cursor, _ = evaluate_sensor(pipeline, instance, cursor)
        assert request_ranges(second) == request_ranges(first)
        assert second.run_key != first.run_key
        assert json.loads(cursor)["retry"]["0/1"]["attempt"] == 1  # per lane
        # Until the lake moves it is not asked for on every tick.
        again, cursor, skip = evaluate_sensor(pipeline, instance, cursor)
        assert again == [] and "re-requested 1 time(s)" in skip.skip_message

        # An operator loads the reference data; the re-request succeeds and covers it all.
        write_reference_data(pipeline.lake, SyntheticBillingStream().reference_data())
        assert run(second).success
        assert alerts.tick() == "all alerts quiet"
        assert notifications(endpoint) == {"ingest_run_failed": "resolved"}
        nothing, cursor, _ = evaluate_sensor(pipeline, instance, cursor)
        assert nothing == [] and "retry" not in json.loads(cursor)


# ---- under the daemon ---------------------------------------------------------------------


class Lane:
    """The pipeline with a Dagster home made from dev/dagster.yaml (Postgres storage), a
    `dagster-daemon` that can be SIGKILLed with its process group and started again, and
    the instance as the UI sees it."""

    def __init__(self, pipeline: Pipeline, logs: Path) -> None:
        self.pipeline, self.logs, self.starts = pipeline, logs, 0
        self.instance = dg.DagsterInstance.from_config(pipeline.env["DAGSTER_HOME"])
        self._daemon = None

    def start(self) -> None:
        self.starts += 1
        self._daemon = dagster_daemon(self.pipeline.env, self.logs / f"daemon-{self.starts}.log")
        self.process = self._daemon.__enter__()

    def kill(self) -> None:
        """SIGKILL the daemon's whole process group: daemon, code server, run workers."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.__exit__(None, None, None)
            self._daemon = None

    def record(self, run_id: str) -> dg.RunRecord:
        return self.instance.get_run_record_by_id(run_id)

    def lane_runs(self) -> list[dg.RunRecord]:
        return [r for r in self.instance.get_run_records() if ingests(r.dagster_run)]


@pytest.fixture
def lane_env(kafka, topic, lake_root, serving_url, postgres, tmp_path, monkeypatch):
    def make(**extra: str) -> dict[str, str]:
        env = operated_env(
            kafka, topic, lake_root, serving_url, postgres, tmp_path / "dagster_home", **extra
        )
        # This process reads the same instance (and loads the code location for GraphQL).
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return env

    return make


@contextmanager
def running_lane(env: dict[str, str], logs: Path) -> Iterator[Lane]:
    lane = Lane(Pipeline(env), logs)
    lane.start()
    try:
        yield lane
    finally:
        lane.stop()
        lane.instance.dispose()
        for log in sorted(logs.glob("daemon-*.log")):
            print(log.name, log.read_text()[-3000:])


def wait_for(what: str, found: Callable[[], T | None], timeout_s: float = 240) -> T:
    deadline = time.monotonic() + timeout_s
    while (value := found()) is None or value is False:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


@contextmanager
def ui_workspace(instance: dg.DagsterInstance) -> Iterator[object]:
    """The code location loaded as `dagster-webserver -w workspace.yaml` loads it."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    target = WorkspaceFileTarget(paths=[str(REPO_ROOT / "workspace.yaml")])
    with WorkspaceProcessContext(instance, target) as process_context:
        yield process_context


def materialize_from_ui(process_context, assets: list[dg.AssetKey], partition: str) -> str:
    """What the UI's *Materialize* of one partition sends: launchPipelineExecution of the
    implicit asset job with the assets selected (the UI adds the other assets of a step
    that cannot run alone); the run goes to the run queue."""
    from dagster_graphql.client.query import LAUNCH_PIPELINE_EXECUTION_MUTATION
    from dagster_graphql.test.utils import execute_dagster_graphql

    context = process_context.create_request_context()
    (location_name,) = context.code_location_names
    (repository,) = context.get_code_location(location_name).get_repositories().values()
    result = execute_dagster_graphql(
        context,
        LAUNCH_PIPELINE_EXECUTION_MUTATION,
        variables={
            "executionParams": {
                "selector": {
                    "repositoryLocationName": location_name,
                    "repositoryName": repository.name,
                    "pipelineName": "__ASSET_JOB",
                    "assetSelection": [asset.to_graphql_input() for asset in assets],
                    "assetCheckSelection": [],
                },
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
                "mode": "default",
                "runConfigData": {},
            }
        },
    )
    launched = result.data["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


# ~60-90 s on an idle 2-core machine: the daemon, a code server for the UI, two short runs.
@pytest.mark.timeout(900)
def test_a_ui_materialization_shares_the_lane_and_the_sensor_waits_for_it(lane_env, tmp_path):
    with running_lane(lane_env(), tmp_path) as lane, ui_workspace(lane.instance) as ui:
        url = lane.pipeline.settings.postgres_url
        migrate(url)
        # The sensor's run is held mid-batch (its balance upsert waits) while the UI's run
        # is launched: a batch is over in seconds, too soon to see the queue otherwise.
        with balance_writes_held(url):
            lane.pipeline.produce(records(41, 300))
            sensor_run = wait_for(
                "the sensor's run to start",
                lambda: next(
                    (
                        r
                        for r in lane.lane_runs()
                        if r.dagster_run.status == dg.DagsterRunStatus.STARTED
                    ),
                    None,
                ),
            ).dagster_run
            assert sensor_run.tags[INGEST_CONCURRENCY_TAG] == "kafka"
            ui_run_id = materialize_from_ui(
                ui, sorted(INGEST_ASSET_KEYS), hour_key(datetime.now(UTC))
            )
            assert not lane.record(sensor_run.run_id).dagster_run.is_finished
            # More records while the UI's run is queued or running: the sensor must wait.
            lane.pipeline.produce(records(42, 300))
        ui_run = wait_for(
            "the UI's run to finish",
            lambda: (r := lane.record(ui_run_id)).dagster_run.is_finished and r,
        )
        first = lane.record(sensor_run.run_id)

        # The UI's run: the implicit asset job, no lane tag, and yet in the lane.
        assert ui_run.dagster_run.job_name == "__ASSET_JOB"
        assert INGEST_CONCURRENCY_TAG not in ui_run.dagster_run.tags
        assert ui_run.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert first.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        # Queued behind the sensor's run by the pool, not beside it.
        assert ui_run.start_time >= first.end_time
        # No sensor run was requested while the UI's run was in flight (the records
        # produced meanwhile wait for it; its hour's offsets took them).
        sensor_runs = [
            r for r in lane.lane_runs() if r.dagster_run.tags.get(INGEST_CONCURRENCY_TAG)
        ]
        assert not [
            r.dagster_run.run_id
            for r in sensor_runs
            if ui_run.create_timestamp.timestamp()
            <= r.create_timestamp.timestamp()
            <= ui_run.end_time
        ]


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid, from its "Started process for run (pid: N)." event."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        found = re.search(r"Started process for run \(pid: (\d+)\)", entry.message or "")
        if found:
            return int(found.group(1))
    return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ~60-90 s on an idle 2-core machine: the daemon twice, a run stranded for its maximum
# runtime (20 s here) and one monitoring poll (10 s).
@pytest.mark.timeout(900)
def test_a_run_whose_worker_died_with_the_code_server_is_failed_and_frees_the_lane(
    lane_env, tmp_path
):
    env = lane_env(BILLING_LANE_MAX_RUNTIME_SECONDS="20")
    with running_lane(env, tmp_path) as lane:
        lane.pipeline.produce(records(51, 300))
        stranded = wait_for(
            "a started ingest run with its worker",
            lambda: next(
                (
                    (r.dagster_run, pid)
                    for r in lane.lane_runs()
                    if r.dagster_run.status == dg.DagsterRunStatus.STARTED
                    and (pid := worker_pid(lane.instance, r.dagster_run.run_id))
                ),
                None,
            ),
        )
        run, pid = stranded
        assert run.tags["dagster/max_runtime"] == "20"
        # Nothing alive is left to report the run's end: the daemon, its code server (which
        # fails a run whose worker died while it lives) and the worker all go at once.
        lane.kill()
        assert not alive(pid)
        assert lane.record(run.run_id).dagster_run.status == dg.DagsterRunStatus.STARTED
        lane.start()

        # Run monitoring fails it once over its maximum runtime (+ one poll interval) ...
        failed = wait_for(
            "run monitoring to fail the stranded run",
            lambda: (r := lane.record(run.run_id)).dagster_run.is_finished and r,
        )
        assert failed.dagster_run.status == dg.DagsterRunStatus.FAILURE
        canceling = lane.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_CANCELING)
        assert any("maximum runtime of 20 seconds" in (e.message or "") for e in canceling)
        # ... and the lane takes the next ingest run (Dagster's retry of it, or the
        # sensor's re-request of its offsets).
        wait_for(
            "the next ingest run to leave the queue",
            lambda: [
                r
                for r in lane.lane_runs()
                if r.create_timestamp > failed.create_timestamp
                and r.dagster_run.status
                not in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED)
            ],
        )
