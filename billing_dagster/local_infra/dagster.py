"""Dagster's own processes (`dagster-daemon`, `dagster dev`) started and stopped by the
demo, the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from billing_dagster.local_infra.process import REPO_ROOT


def dagster_command(name: str) -> str:
    """A console script of the environment this Python runs in (dagster-daemon, ...)."""
    return str(Path(sys.executable).parent / name)


@contextmanager
def dagster_daemon(env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`dagster-daemon run` on this repository's workspace, as production runs it: the
    sensors, the schedules, the run queue and backfills. `env` adds to this process's."""
    with log.open("w") as output:
        daemon = subprocess.Popen(
            [dagster_command("dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield daemon
        finally:
            stop_process_group(daemon)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM a process started with start_new_session, wait, then make sure nothing of
    its group stays (Dagster's code servers have been seen to outlive their parent)."""
    group = process.pid
    if process.poll() is None:
        os.killpg(group, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
