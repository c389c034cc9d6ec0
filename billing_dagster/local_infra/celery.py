"""Celery workers that execute the pipeline's Dagster runs (the Celery engine, docs/scaling.md),
started and stopped by the demo, the tests and the benchmarks.

Each worker is `dagster-celery worker start` (which writes the Celery settings of
dev/celery/worker.yaml into $DAGSTER_HOME and runs `celery worker`) with a prefork pool:
every pool process runs one Dagster run at a time, in process. The worker's main process
imports the code location and the heavy libraries before it forks its pool (WARM_IMPORTS),
so a run starts in a process that has everything loaded. It keeps that code until it is
restarted: a deploy restarts workers (`CeleryWorkers.restart`).

Stopping gracefully means SIGTERM to the `celery` main process alone (from its pidfile):
it stops taking runs, lets the running ones finish, hands reserved messages back to
Redis and exits, and the `dagster-celery` wrapper with it. SIGTERM to the whole process
group would kill the pool processes mid-run (they reset SIGTERM to its default).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from billing_dagster.local_infra.dagster import BASE_INSTANCE_YAML, dagster_command
from billing_dagster.local_infra.process import (
    REPO_ROOT,
    InfraError,
    LocalServer,
    tail,
    wait_until,
)

#: Settings of the worker's Celery app (broker, result backend, prefork options).
WORKER_CONFIG = REPO_ROOT / "dev" / "celery" / "worker.yaml"
#: The environment variable with the Redis URL, read by dev/celery/*.yaml.
BROKER_URL_ENV = "DAGSTER_CELERY_BROKER_URL"
#: The queue CeleryRunLauncher sends runs to (dagster-celery's default).
QUEUE = "dagster"
#: Imported by each worker's main process at start, before its pool forks: the code
#: location (which builds the Definitions), then the libraries a run's first step would
#: otherwise import (~10 CPU seconds in all, 7.5 of them great_expectations).
WARM_IMPORTS = ("billing_dagster.definitions", "polars", "deltalake", "great_expectations")


def worker_command(
    name: str, *, concurrency: int, pidfile: Path, config: Path = WORKER_CONFIG
) -> list[str]:
    """The command line of one worker (also what docs/scaling.md and the Kubernetes
    manifest run). Options after `--` go to `celery worker` itself."""
    includes = [arg for module in WARM_IMPORTS for arg in ("--includes", module)]
    return [
        dagster_command("dagster-celery"),
        "worker",
        "start",
        "--app",
        "dagster_celery.app",
        "--config-yaml",
        str(config),
        "--name",
        name,
        "--queue",
        QUEUE,
        *includes,
        "--loglevel",
        "INFO",
        "--",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--pidfile={pidfile}",
    ]


def pool_size(workers: int, instance_yaml: Path = BASE_INSTANCE_YAML) -> int:
    """Pool processes per worker so that `workers` workers hold every run the run queue
    may have in flight at once (concurrency.runs.max_concurrent_runs of the instance): a
    run launched with no free pool process waits in Redis as STARTING, and run monitoring
    fails it after start_timeout_seconds."""
    config = yaml.safe_load(instance_yaml.read_text()) or {}
    runs = (config.get("concurrency") or {}).get("runs") or {}
    # Dagster's own default when the instance does not say.
    in_flight = int(runs.get("max_concurrent_runs", 10))
    return max(1, math.ceil(in_flight / workers))


def node_name(name: str) -> str:
    """Celery's name of a worker started with `--name NAME` on this host."""
    return f"{name}@{socket.gethostname()}"


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus `env`, with the virtualenv's bin/ first on PATH:
    `dagster-celery worker start` runs `celery` from PATH."""
    merged = {**os.environ, **env}
    merged["PATH"] = os.pathsep.join([str(Path(dagster_command("celery")).parent), merged["PATH"]])
    if BROKER_URL_ENV not in merged:
        raise InfraError(f"Celery workers need {BROKER_URL_ENV} (the Redis URL)")
    if "DAGSTER_HOME" not in merged:
        raise InfraError("Celery workers need DAGSTER_HOME (the instance the runs belong to)")
    return merged


class CeleryWorker:
    """One worker: its `dagster-celery` process group, log and the pidfile of `celery`."""

    def __init__(self, name: str, concurrency: int, workdir: Path) -> None:
        self.name = name
        self.node = node_name(name)
        self.concurrency = concurrency
        self.log = workdir / f"{name}.log"
        self.pidfile = workdir / f"{name}.pid"
        self.process: subprocess.Popen | None = None

    def spawn(self, env: dict[str, str]) -> None:
        # A pidfile left by a killed worker would only be checked and replaced; start clean.
        self.pidfile.unlink(missing_ok=True)
        command = worker_command(self.name, concurrency=self.concurrency, pidfile=self.pidfile)
        with self.log.open("ab") as log:
            # Its own process group (kill() takes the pool with it), in the repository as
            # the code location's working directory. No PR_SET_PDEATHSIG as for the servers
            # (process.spawn): it follows the spawning *thread*, and a restart may run in
            # one; nor would the wrapper's death stop `celery`.
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def main_pid(self) -> int | None:
        """The `celery` main process (the parent of the pool), once it has started."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def pool_pids(self) -> list[int]:
        """The pool processes (children of the celery main process; Linux /proc)."""
        main = self.main_pid()
        try:
            return [int(p) for p in Path(f"/proc/{main}/task/{main}/children").read_text().split()]
        except OSError:
            return []

    def group(self) -> int | None:
        """The process group of the wrapper, celery and its pool processes."""
        alive = self.process is not None and self.process.poll() is None
        return self.process.pid if alive and self.process is not None else None

    def stop(self, timeout_s: float) -> None:
        """Warm shutdown: the running runs finish first, within `timeout_s`; then SIGKILL."""
        if self.group() is None:
            self.process = None
            return
        main = self.main_pid()
        if main is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(main, signal.SIGTERM)
        try:
            assert self.process is not None
            self.process.wait(timeout=timeout_s if main is not None else 0.1)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or the OOM killer of a host would."""
        group = self.group()
        if group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            assert self.process is not None
            self.process.wait(timeout=30)
        self.process = None


class CeleryWorkers(LocalServer):
    """`with CeleryWorkers(env, count=2) as workers:` starts `count` warm workers named
    worker-1..N, each running up to `concurrency` runs at once (default: enough for every
    run the queue may have in flight, see `pool_size`), and waits until each answers a
    ping through the broker.

    `env` adds to this process's environment and must hold what a run needs: DAGSTER_HOME
    (with the Celery launcher's instance yaml), DAGSTER_POSTGRES_URL,
    DAGSTER_CELERY_BROKER_URL and the pipeline's BILLING_* settings.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        count: int = 2,
        concurrency: int | None = None,
        workdir: Path | None = None,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.env = worker_env(env)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="billing-celery-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.concurrency = concurrency or pool_size(count)
        #: The current worker of each slot (worker-1..N).
        self.workers = {
            f"worker-{i + 1}": CeleryWorker(f"worker-{i + 1}", self.concurrency, self.workdir)
            for i in range(count)
        }
        #: Workers a restart replaced (their logs stay; stop() makes sure they are gone).
        self.retired: list[CeleryWorker] = []
        self.restarts = 0
        self.ready_timeout_s = ready_timeout_s
        self._app = None

    @property
    def app(self):
        """A Celery client on the broker, for pings (control messages through Redis)."""
        if self._app is None:
            from celery import Celery

            self._app = Celery("billing-control", broker=self.env[BROKER_URL_ENV])
        return self._app

    def __getitem__(self, slot: str) -> CeleryWorker:
        return self.workers[slot]

    def every_worker(self) -> list[CeleryWorker]:
        return [*self.retired, *self.workers.values()]

    def start(self) -> CeleryWorkers:
        self._start_all(list(self.workers.values()))
        return self

    def _start_all(self, workers: list[CeleryWorker]) -> None:
        for worker in workers:  # side by side: the imports take a few seconds each
            worker.spawn(self.env)
        for worker in workers:
            self.wait_ready(worker)

    def wait_ready(self, worker: CeleryWorker) -> None:
        """Until the worker consumes: it answers a ping (its imports done, pool forked)."""
        wait_until(
            lambda: bool(self.app.control.ping(destination=[worker.node], timeout=1.0)),
            what=f"Celery worker {worker.node}",
            process=worker.process,
            log=worker.log,
            timeout_s=self.ready_timeout_s,
        )

    def start_worker(self, slot: str) -> None:
        """Start a slot's worker again (after kill(): what a supervisor does)."""
        worker = self.workers[slot]
        worker.spawn(self.env)
        self.wait_ready(worker)

    def restart(self, order: list[str] | None = None, *, timeout_s: float = 960.0) -> None:
        """A deploy: one worker after the other (every slot, or the slots of `order`) gets
        a warm shutdown, finishing its runs (within `timeout_s`: the lane's maximum runtime
        and a margin), and a new worker with the code as it is now takes its place before
        the next one goes. The others keep taking runs meanwhile: no run is interrupted."""
        self.restarts += 1
        for slot in order if order is not None else list(self.workers):
            old = self.workers[slot]
            self._stop_all([old], timeout_s)
            self.retired.append(old)
            fresh = CeleryWorker(f"{slot}-r{self.restarts}", self.concurrency, self.workdir)
            self.workers[slot] = fresh
            self._start_all([fresh])

    def kill(self, slot: str) -> None:
        """SIGKILL one worker's whole process group (tests: a host or container lost)."""
        self.workers[slot].kill()

    def worker_of(self, pid: int) -> CeleryWorker | None:
        """The worker whose process group holds `pid` (a run's "Started process" pid)."""
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return None
        return next((w for w in self.every_worker() if w.group() == group), None)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"--- {w.node}\n{tail(w.log, lines)}" for w in self.every_worker())

    def _stop_all(self, workers: list[CeleryWorker], timeout_s: float) -> None:
        for worker in workers:  # every warm shutdown begins at once
            main = worker.main_pid()
            if worker.group() is not None and main is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(main, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.stop(max(0.1, deadline - time.monotonic()))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Every worker, gracefully within `timeout_s`, then killed."""
        self._stop_all(self.every_worker(), timeout_s)
        if self._app is not None:
            self._app.close()
            self._app = None
