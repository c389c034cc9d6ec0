"""PostgreSQL from Debian's package: initdb into a throwaway folder, start on a free port.

Postgres refuses to run as root; as root the server runs as the `postgres` system user
that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from billing_dagster.local_infra.process import InfraError, LocalServer, free_port, tail, wait_until


def postgres_bindir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not candidates:
        raise InfraError(
            "PostgreSQL server binaries are missing: run dev/setup.sh "
            "(it installs Debian's postgresql package)"
        )
    return Path(candidates[-1]).parent


class LocalPostgres(LocalServer):
    """`with LocalPostgres() as pg:` gives `pg.url` for a fresh `billing` database."""

    def __init__(self, *, database: str = "billing", user: str = "billing") -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.database = database
        self.user = user
        self.workdir = Path(tempfile.mkdtemp(prefix="billing-postgres-"))
        self.datadir = self.workdir / "data"
        self.log = self.workdir / "postgres.log"
        self._as_root = os.geteuid() == 0
        self._started = False

    @property
    def url(self) -> str:
        return self._url_of(self.database)

    def _url_of(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise InfraError(f"{args[0]} failed:\n{result.stdout}{result.stderr}\n{tail(self.log)}")
        return result

    def start(self) -> LocalPostgres:
        if self._as_root:
            shutil.chown(self.workdir, user="postgres", group="postgres")
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            self.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        self._pg_ctl_start()
        self.create_database(self.database)
        return self

    def _pg_ctl_start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200 -c wal_level=logical"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        self._started = True
        wait_until(
            lambda: (
                subprocess.run(
                    [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                    capture_output=True,
                ).returncode
                == 0
            ),
            what=f"Postgres on port {self.port}",
            timeout_s=30,
            log=self.log,
        )

    def create_database(self, name: str) -> str:
        """A further empty database on this server; returns its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self._url_of(name)

    def pause(self) -> None:
        """Stop the server as a crash would (immediate), keeping its data and port."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        self._started = False

    def resume(self) -> None:
        self._pg_ctl_start()

    def stop(self) -> None:
        if self._started:
            with contextlib.suppress(InfraError):
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.workdir, ignore_errors=True)
