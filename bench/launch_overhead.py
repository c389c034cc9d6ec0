"""What a run costs to start: the default run launcher (a new process per run, started by the
code server) against the Celery engine (a warm Celery worker), in one invocation.

Both on a Postgres-backed instance made by write_instance_yaml (dev/dagster.yaml, plus
dev/celery/run_launcher.yaml for Celery) with a real `dagster-daemon` dequeuing the runs.
The job is trivial (one op, in process), so the figures are the engine's own overhead:

- launch -> start: from the launcher being asked (RunStats.launch_time) to the run worker
  starting the run (start_time);
- launch -> success: to the run's end (end_time);
- enqueue -> start, for context: includes the run queue's dequeue interval (1 s).

Runs go one at a time (launched as the UI launches them, through GraphQL into the queue),
after a few warm-up runs that are not counted (a pool process loads this file at its
first run; the code server starts once).

    .venv/bin/python bench/launch_overhead.py --runs 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import dagster as dg

WORKSPACE = """load_from:
  - python_file:
      relative_path: {path}
      working_directory: {cwd}
      attribute: defs
"""


@dg.op
def nothing() -> None:
    """Does nothing: the run's cost is the engine's."""


@dg.job(executor_def=dg.in_process_executor)
def trivial() -> None:
    nothing()


defs = dg.Definitions(jobs=[trivial])


def launch(context) -> str:
    """launchPipelineExecution of the trivial job, as the UI's Launchpad sends it."""
    from dagster_graphql.client.query import LAUNCH_PIPELINE_EXECUTION_MUTATION
    from dagster_graphql.test.utils import execute_dagster_graphql

    request = context.create_request_context()
    (location,) = request.code_location_names
    (repository,) = request.get_code_location(location).get_repositories().values()
    result = execute_dagster_graphql(
        request,
        LAUNCH_PIPELINE_EXECUTION_MUTATION,
        variables={
            "executionParams": {
                "selector": {
                    "repositoryLocationName": location,
                    "repositoryName": repository.name,
                    "pipelineName": "trivial",
                },
                "mode": "default",
                "runConfigData": {},
            }
        },
    )
    launched = result.data["launchPipelineExecution"]
    if launched["__typename"] != "LaunchRunSuccess":
        raise RuntimeError(f"launch failed: {launched}")
    return launched["run"]["runId"]


def wait_finished(instance: dg.DagsterInstance, run_id: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not instance.get_run_by_id(run_id).is_finished:
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} did not finish in {timeout_s:.0f}s")
        time.sleep(0.05)
    status = instance.get_run_by_id(run_id).status
    if status != dg.DagsterRunStatus.SUCCESS:
        raise RuntimeError(f"run {run_id} ended {status.value}")


def measure(engine: str, *, root: Path, postgres, redis_url: str, runs: int, warmup: int) -> dict:
    """Figures of `runs` trivial runs under `engine`, in seconds."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    from billing_dagster.local_infra.celery import BROKER_URL_ENV, CeleryWorkers
    from billing_dagster.local_infra.dagster import (
        dagster_command,
        stop_process_group,
        write_instance_yaml,
    )
    from billing_dagster.local_infra.process import REPO_ROOT

    home = root / engine
    write_instance_yaml(home, engine)
    workspace = root / "workspace.yaml"
    workspace.write_text(WORKSPACE.format(path=Path(__file__).resolve(), cwd=REPO_ROOT))
    env = {
        "DAGSTER_HOME": str(home),
        "DAGSTER_POSTGRES_URL": postgres.create_database(f"dagster_{engine}"),
        BROKER_URL_ENV: redis_url,
    }
    os.environ.update(env)  # this process reads the same instance
    with ExitStack() as stack:
        instance = dg.DagsterInstance.from_config(str(home))  # creates the storage once
        stack.callback(instance.dispose)
        extra_warmup = 0
        if engine == "celery":
            workers = stack.enter_context(CeleryWorkers(env, count=1, workdir=home / "celery"))
            # Each pool process loads this file at its first run: warm them all.
            extra_warmup = workers.concurrency
        log = (home / "daemon.log").open("w")
        stack.callback(log.close)
        daemon = subprocess.Popen(
            [dagster_command("dagster-daemon"), "run", "-w", str(workspace)],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(stop_process_group, daemon)
        context = stack.enter_context(
            WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(workspace)]))
        )
        figures: dict[str, list[float]] = {"launch_start": [], "launch_end": [], "queue_start": []}
        for i in range(warmup + extra_warmup + runs):
            run_id = launch(context)
            wait_finished(instance, run_id)
            if i < warmup + extra_warmup:
                continue
            stats = instance.get_run_stats(run_id)
            figures["launch_start"].append(stats.start_time - stats.launch_time)
            figures["launch_end"].append(stats.end_time - stats.launch_time)
            figures["queue_start"].append(stats.start_time - stats.enqueued_time)
        return figures


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):5.2f}  p95 {p95:5.2f}  max {ordered[-1]:5.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="counted runs per engine")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted runs per engine")
    args = parser.parse_args()

    from machine_info import machine  # bench/ is the script folder, so on sys.path

    from billing_dagster.local_infra.postgres import LocalPostgres
    from billing_dagster.local_infra.redis import LocalRedis

    results = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-launch-") as root,
        LocalPostgres(database="dagster") as postgres,
        LocalRedis() as redis,
    ):
        for engine in ("default", "celery"):
            print(f"{engine}: {args.warmup} warm-up runs, then {args.runs} ...", flush=True)
            results[engine] = measure(
                engine,
                root=Path(root),
                postgres=postgres,
                redis_url=redis.url,
                runs=args.runs,
                warmup=args.warmup,
            )
    print(f"\n{machine()}")
    print(f"trivial in-process job, {args.runs} runs each, one at a time, seconds")
    for engine, figures in results.items():
        print(f"{engine:8} launch -> start    {summary(figures['launch_start'])}")
        print(f"{'':8} launch -> success  {summary(figures['launch_end'])}")
        print(f"{'':8} enqueue -> start   {summary(figures['queue_start'])}")


if __name__ == "__main__":
    sys.exit(main())
