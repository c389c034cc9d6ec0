"""A barrier between ingest lanes committing batches and readers that need a lake at rest.

Lanes commit in parallel: between a batch's first lake commit (billing_events) and its
last (raw/), the tables disagree about it. Readers that compare stores (reconciliation:
the aggregates against raw/; the invariant checks: Postgres against the lake) or that
acknowledge a rewrite only if no batch landed (compaction) take the barrier exclusively:
while they hold it no batch is half-committed, and batches wait to start committing.

It is a Postgres advisory lock on the serving database, held on its own connection: a
process that dies releases it with its connection, so a killed worker never wedges the
lane. Batches hold it shared (they never wait for each other), readers exclusively; a
reader waiting for it goes before batches that ask after it (Postgres queues lock
requests in order), so a steady stream of batches cannot starve reconciliation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2

from billing_dagster.postgres_db import ServingUnavailableError, connect, first_line, redacted

#: Any constant; distinct from the migration lock in postgres_db.py.
BARRIER_KEY = 0x6C616B65


class LakeBusyError(RuntimeError):
    """The barrier was not granted in time (a batch stuck mid-commit); retry later."""


@contextmanager
def _held(url: str, function: str, timeout_s: float) -> Iterator[None]:
    with connect(url) as connection:
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = %s", (f"{int(timeout_s * 1000)}ms",))
                cursor.execute(f"SELECT {function}(%s)", (BARRIER_KEY,))
        except psycopg2.errors.LockNotAvailable:
            raise LakeBusyError(
                f"the lake barrier was not granted within {timeout_s:.0f} s "
                f"(Postgres at {redacted(url)}): a batch is committing or stuck; retry"
            ) from None
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            raise ServingUnavailableError(
                f"cannot take the lake barrier on {redacted(url)}: {first_line(exc)}"
            ) from None
        # Closing the connection releases the lock, however the block ends.
        yield


@contextmanager
def committing_batch(url: str | None, timeout_s: float = 300.0) -> Iterator[None]:
    """Held (shared) by a batch from its first lake commit to its last. `url` None: no
    serving database (lake-only runs, benchmarks): nothing to hold."""
    if url is None:
        yield
        return
    with _held(url, "pg_advisory_lock_shared", timeout_s):
        yield


@contextmanager
def lake_at_rest(url: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Held (exclusively) by a reader: no batch is between its first and last commit."""
    with _held(url, "pg_advisory_lock", timeout_s):
        yield
