"""Redis from Debian's `redis-server` package, on loopback, for Celery (broker and result
backend of the Celery run launcher).

Nothing is persisted (no RDB snapshots, no append-only file): this Redis lives as long as
the demo or the test session that started it. The broker only carries run launches, and
Dagster's run storage in Postgres is the truth about runs; but the result backend holds
the task state run monitoring's health check reads, so a Redis that restarts empty makes
run monitoring fail the runs in flight while their workers go on. A production Redis keeps
its data (`appendonly yes`, docs/scaling.md).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from billing_dagster.local_infra.process import (
    InfraError,
    LocalServer,
    free_port,
    spawn,
    stop_process,
    wait_until,
)


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise InfraError(
            "redis-server is not installed: run dev/setup.sh (it installs Debian's "
            "redis-server package)"
        )
    return binary


class LocalRedis(LocalServer):
    """`with LocalRedis() as redis:` gives `redis.url` (redis://127.0.0.1:PORT/0)."""

    def __init__(self) -> None:
        self.binary = redis_server_binary()
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="billing-redis-"))
        self.log = self.workdir / "redis.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> LocalRedis:
        self.process = spawn(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "yes",
                "--dir",
                str(self.workdir),
                # No persistence (see the module's docstring): an empty `save` turns RDB off.
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ],
            log=self.log,
        )
        wait_until(
            self.ping,
            what=f"Redis on port {self.port}",
            process=self.process,
            log=self.log,
            timeout_s=timeout_s,
        )
        return self

    def ping(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)
