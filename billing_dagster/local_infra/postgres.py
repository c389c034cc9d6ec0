"""PostgreSQL from Debian's package: initdb into a throwaway folder, start on a free port.

Postgres refuses to run as root; as root the server runs as the `postgres` system user
that Debian's package creates.

Durable by default (`fsync`, `synchronous_commit`, `full_page_writes` on): the demo and the
benchmarks measure a database someone would run. The test suite may start a non-durable
one for speed; the pipeline must keep the money either way (a commit lost to a crash
leaves the serving marks behind the lake, and the next run applies it again).
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


def _copy_preserving_owner(source: Path, target: Path) -> None:
    """cp -a: the server (the postgres user, when we are root) must own the copy."""
    subprocess.run(["cp", "-a", str(source), str(target)], check=True, timeout=300)


class LocalPostgres(LocalServer):
    """`with LocalPostgres() as pg:` gives `pg.url` for a fresh `billing` database."""

    def __init__(
        self,
        *,
        database: str = "billing",
        user: str = "billing",
        durable: bool = True,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.durable = durable
        #: Further server settings (-c name=value), e.g. for tests that lose commits.
        self.settings = dict(settings or {})
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
        durability = (
            "-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
            if self.durable
            else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} {durability} "
            "-c max_connections=200 -c wal_level=logical"
            + "".join(f" -c {name}={value}" for name, value in self.settings.items())
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

    def snapshot(self, name: str) -> Path:
        """A copy of the data directory, taken with the server cleanly stopped (as a file
        system backup would be), then the server is started again."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        self._started = False
        copy = self.workdir / f"snapshot-{name}"
        _copy_preserving_owner(self.datadir, copy)
        self._pg_ctl_start()
        return copy

    def restore(self, snapshot: Path) -> None:
        """Put the data directory back to `snapshot` (a restore from backup): every commit
        since is gone."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        self._started = False
        shutil.rmtree(self.datadir)
        _copy_preserving_owner(snapshot, self.datadir)
        self._pg_ctl_start()

    def stop(self) -> None:
        if self._started:
            with contextlib.suppress(InfraError):
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.workdir, ignore_errors=True)
