"""Connections to the project's Postgres databases and their migrations.

Errors a user can cause (a wrong URL, a server that is down) become one-line messages that
name the setting; the password in a URL is never printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import psycopg2.extensions

# One redaction for every configured URL (alerts, settings, here); re-exported for callers.
from billing_dagster.redaction import redacted as redacted

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x62696C6C  # any constant: serialises concurrent migrators


class ServingUnavailableError(RuntimeError):
    """Postgres cannot be reached or failed mid-batch; a retry is safe."""


def first_line(exc: Exception) -> str:
    """psycopg2's messages run over several lines; the first one says what happened."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def connect(
    url: str, *, setting: str = "BILLING_POSTGRES_URL", what: str = "the serving Postgres"
) -> Iterator[psycopg2.extensions.connection]:
    try:
        connection = psycopg2.connect(url, connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise ServingUnavailableError(
            f"cannot reach {what} at {redacted(url)} ({setting}): {first_line(exc)}"
        ) from None
    try:
        yield connection
    finally:
        connection.close()


# ---- migrations --------------------------------------------------------------------


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    return sorted(directory.glob("*.sql"))


def migrate(
    url: str,
    directory: Path = MIGRATIONS_DIR,
    *,
    setting: str = "BILLING_POSTGRES_URL",
    what: str = "the serving Postgres",
) -> list[str]:
    """Apply the migrations not yet applied, in file-name order; returns their names.

    Safe to run any number of times and from several processes at once."""
    applied: list[str] = []
    with (
        connect(url, setting=setting, what=what) as connection,
        connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        # Qualified: a role named like a schema (user billing, schema billing) would
        # otherwise find a second, empty ledger through search_path's "$user".
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS public.schema_migrations ("
            " version TEXT PRIMARY KEY,"
            " applied_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW())"
        )
        cursor.execute("SELECT version FROM public.schema_migrations")
        done = {row[0] for row in cursor.fetchall()}
        for path in migration_files(directory):
            if path.name in done:
                continue
            cursor.execute(path.read_text())
            cursor.execute(
                "INSERT INTO public.schema_migrations (version) VALUES (%s)", (path.name,)
            )
            applied.append(path.name)
    return applied
