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

import yaml

from billing_dagster.local_infra.process import REPO_ROOT, InfraError

#: The instance of production, the demo and the tests (storage, run queue, lane, monitoring).
BASE_INSTANCE_YAML = REPO_ROOT / "dev" / "dagster.yaml"
#: How runs leave the queue: "default" (a process per run, started through the code
#: server; dev/dagster.yaml alone) or "celery" (warm Celery workers, docs/scaling.md).
ENGINES = ("default", "celery")
_LAUNCHER_YAML = {"celery": REPO_ROOT / "dev" / "celery" / "run_launcher.yaml"}


def write_instance_yaml(home: Path, engine: str = "default") -> Path:
    """Write $DAGSTER_HOME/dagster.yaml for `engine`: dev/dagster.yaml as it is, followed
    by the engine's `run_launcher` block. Appended as text, so the base file stays the one
    definition of everything else, comments included."""
    if engine not in ENGINES:
        raise InfraError(f"the run engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    text = BASE_INSTANCE_YAML.read_text()
    if engine in _LAUNCHER_YAML:
        addition = _LAUNCHER_YAML[engine].read_text()
        # YAML lets a repeated key win silently: a section in both files is refused instead.
        both = set(yaml.safe_load(text) or {}) & set(yaml.safe_load(addition) or {})
        if both:
            raise InfraError(f"{_LAUNCHER_YAML[engine]} repeats {sorted(both)} of dev/dagster.yaml")
        text = f"{text.rstrip()}\n\n{addition}"
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    target.write_text(text)
    return target


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
