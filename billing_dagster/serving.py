"""The Postgres serving layer: customer_balances and transaction_history, exactly once.

One batch is applied in one transaction:
1. lock the batch's Kafka partitions in `balance_offsets` (FOR UPDATE, in partition order)
   and keep only accepted events at or above each partition's next offset;
2. create the monthly transaction_history partitions the rows need;
3. COPY the history rows and the per-customer deltas into temporary staging tables, then
   INSERT ... ON CONFLICT: history rows are skipped if present, balances are increased
   (`version = version + 1`), customers locked in id order so concurrent runs cannot
   deadlock on each other;
4. advance `balance_offsets` and record the batch in the `balance_batches` ledger.

A rerun, retry or replay of the same offsets finds them below `next_offset` and changes
nothing; a crash before COMMIT changes nothing either. Balance semantics: a customer's
balance is the sum of `amount_usd` of their accepted events, in USD. PAYMENT adds,
REFUND and CHARGEBACK (negative amounts) subtract, ADJUSTMENT adds its signed amount.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import polars as pl
import psycopg2
import psycopg2.extensions

from billing_dagster.timing import PhaseClock

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BALANCE_CURRENCY = "USD"
#: Namespace for transaction ids of events whose event_id is not itself a UUID.
TRANSACTION_NAMESPACE = uuid.UUID("6f1c1d2e-8a4b-4f0e-9a57-0b1e2d3c4f5a")
_UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_MIGRATION_LOCK = 0x62696C6C  # any constant: serialises concurrent migrators


class ServingUnavailableError(RuntimeError):
    """Postgres cannot be reached or failed mid-batch; a retry is safe."""


def _redacted(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}@{host}"
    return url


def _first_line(exc: Exception) -> str:
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
            f"cannot reach {what} at {_redacted(url)} ({setting}): {_first_line(exc)}"
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


# ---- pure frame work ---------------------------------------------------------------


def transaction_ids(event_ids: pl.Series) -> pl.Series:
    """event_id as a UUID: itself when it is one, else a stable uuid5 of it."""
    is_uuid = event_ids.str.contains(_UUID_PATTERN)
    if is_uuid.all():
        return event_ids.str.to_lowercase()
    derived = event_ids.map_elements(
        lambda e: str(uuid.uuid5(TRANSACTION_NAMESPACE, e)), return_dtype=pl.String
    )
    return pl.select(pl.when(is_uuid).then(event_ids.str.to_lowercase()).otherwise(derived))[
        event_ids.name
    ]


def history_rows(accepted: pl.DataFrame) -> pl.DataFrame:
    return accepted.select(
        transaction_ids(accepted["event_id"]).alias("transaction_id"),
        "customer_id",
        "amount",
        "transaction_type",
        "created_at",
        "currency",
        "amount_usd",
        "event_id",
    )


def balance_deltas(accepted: pl.DataFrame) -> pl.DataFrame:
    """Per customer: the USD change to the balance, how many events, the latest event."""
    return (
        accepted.group_by("customer_id")
        .agg(
            pl.col("amount_usd").sum().alias("delta"),
            pl.len().alias("events"),
            pl.col("created_at").max().alias("last_event_at"),
        )
        .sort("customer_id")
    )


def months_of(created_at: pl.Series) -> list[date]:
    return sorted(created_at.dt.truncate("1mo").dt.date().unique().to_list())


def _next_month(month: date) -> date:
    return date(month.year + (month.month == 12), month.month % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"transaction_history_{month:%Y%m}"


def batch_id(topic: str, applied: Mapping[int, tuple[int, int]]) -> str:
    identity = json.dumps({"topic": topic, "ranges": sorted(applied.items())})
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


# ---- the transaction -----------------------------------------------------------------


@dataclass(frozen=True)
class ServingResult:
    events_applied: int
    events_already_applied: int
    customers_updated: int
    history_inserted: int
    batch_id: str | None
    partitions_created: tuple[str, ...]
    #: Seconds per phase (copy_history, insert_history, copy_balances, upsert_balances, commit).
    timings: Mapping[str, float] = field(default_factory=dict)


def _copy(cursor: psycopg2.extensions.cursor, table: str, frame: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.with_columns(
        [
            pl.col(name).dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%d %H:%M:%S%.6f+00")
            for name, dtype in frame.schema.items()
            if isinstance(dtype, pl.Datetime)
        ]
    ).write_csv(buffer, include_header=False)
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} FROM STDIN WITH (FORMAT csv)", buffer)


def ensure_partitions(connection: psycopg2.extensions.connection, months: list[date]) -> list[str]:
    """Create the monthly transaction_history partitions that are missing, committed.

    Runs in its own short transaction before the batch's, so a batch never holds the
    parent's ACCESS EXCLUSIVE lock (taken by CREATE TABLE ... PARTITION OF) while it
    upserts balances. The self-conflicting lock on the parent serialises creators, and
    taking a relation lock refreshes the catalog cache, so the second creator sees the
    first one's table instead of failing with "already exists"."""
    with connection.cursor() as cursor:
        names = [partition_name(month) for month in months]
        cursor.execute(
            "SELECT n FROM unnest(%s::text[]) AS n WHERE to_regclass(n) IS NULL", (names,)
        )
        if not cursor.fetchall():
            connection.commit()
            return []
    created = []
    with connection, connection.cursor() as cursor:
        cursor.execute("LOCK TABLE transaction_history IN SHARE UPDATE EXCLUSIVE MODE")
        for month in months:
            name = partition_name(month)
            cursor.execute("SELECT to_regclass(%s)", (name,))
            if cursor.fetchone()[0] is None:
                cursor.execute(
                    f"CREATE TABLE {name} PARTITION OF transaction_history "
                    "FOR VALUES FROM (%s) TO (%s)",
                    (month.isoformat(), _next_month(month).isoformat()),
                )
                created.append(name)
    return created


def apply_batch(
    url: str,
    accepted: pl.DataFrame,
    *,
    topic: str,
    processed_up_to: Mapping[int, int],
    run_id: str,
) -> ServingResult:
    """Apply a batch's accepted events to the balances and history, exactly once.

    `processed_up_to`: next offset per Kafka partition once this batch is in (every
    partition the batch read, including those without accepted events)."""
    try:
        with connect(url) as connection:
            created = ensure_partitions(connection, months_of(accepted["created_at"]))
            return _apply_locked(connection, accepted, topic, processed_up_to, run_id, created)
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise ServingUnavailableError(
            f"serving Postgres at {_redacted(url)} failed mid-batch, nothing was committed: "
            f"{_first_line(exc)}"
        ) from None


def _apply_locked(
    connection: psycopg2.extensions.connection,
    accepted: pl.DataFrame,
    topic: str,
    processed_up_to: Mapping[int, int],
    run_id: str,
    created: list[str],
) -> ServingResult:
    partitions = sorted(processed_up_to)
    with connection, connection.cursor() as cursor:
        if partitions:
            cursor.execute(
                "INSERT INTO balance_offsets (topic, kafka_partition, next_offset) "
                "SELECT %s, p, 0 FROM unnest(%s::int[]) AS p ON CONFLICT DO NOTHING",
                (topic, partitions),
            )
        cursor.execute(
            "SELECT kafka_partition, next_offset FROM balance_offsets "
            "WHERE topic = %s AND kafka_partition = ANY(%s) "
            "ORDER BY kafka_partition FOR UPDATE",
            (topic, partitions),
        )
        marks = dict(cursor.fetchall())
        advance = {
            p: (marks.get(p, 0), end) for p, end in processed_up_to.items() if end > marks.get(p, 0)
        }
        mark_frame = pl.DataFrame(
            {"kafka_partition": list(marks), "_next": list(marks.values())},
            schema={"kafka_partition": pl.Int32, "_next": pl.Int64},
        )
        fresh = (
            accepted.join(mark_frame, on="kafka_partition", how="left")
            .filter(pl.col("kafka_offset") >= pl.col("_next").fill_null(0))
            .drop("_next")
        )
        if not advance:
            return ServingResult(0, accepted.height, 0, 0, None, tuple(created))

        history = history_rows(fresh)
        deltas = balance_deltas(fresh)
        cursor.execute(
            "CREATE TEMP TABLE staging_history (LIKE transaction_history "
            "INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        clock = PhaseClock()
        _copy(cursor, "staging_history", history)
        clock.lap("copy_history")
        cursor.execute(
            "INSERT INTO transaction_history SELECT * FROM staging_history ON CONFLICT DO NOTHING"
        )
        history_inserted = cursor.rowcount
        clock.lap("insert_history")
        cursor.execute(
            "CREATE TEMP TABLE staging_deltas (customer_id BIGINT, delta DECIMAL(14,2), "
            "events INT, last_event_at TIMESTAMPTZ) ON COMMIT DROP"
        )
        _copy(cursor, "staging_deltas", deltas)
        clock.lap("copy_balances")
        cursor.execute(
            "INSERT INTO customer_balances "
            "  (customer_id, current_balance, currency, last_updated, version) "
            "SELECT customer_id, delta, %s, NOW(), 1 FROM staging_deltas "
            "ORDER BY customer_id "
            "ON CONFLICT (customer_id) DO UPDATE SET "
            "  current_balance = customer_balances.current_balance "
            "    + EXCLUDED.current_balance, "
            "  last_updated = EXCLUDED.last_updated, "
            "  version = customer_balances.version + 1",
            (BALANCE_CURRENCY,),
        )
        customers = cursor.rowcount
        clock.lap("upsert_balances")
        for partition, (_, end) in sorted(advance.items()):
            cursor.execute(
                "UPDATE balance_offsets SET next_offset = %s, updated_at = NOW() "
                "WHERE topic = %s AND kafka_partition = %s",
                (end, topic, partition),
            )
        identity = batch_id(topic, advance)
        total = fresh["amount_usd"].sum() if fresh.height else 0
        cursor.execute(
            # clock_timestamp(), not NOW(): the moment the balances are about to commit,
            # not when the transaction began (the latency benchmark reads it).
            "INSERT INTO balance_batches (batch_id, topic, offset_ranges, run_id, "
            "events_applied, customers_updated, amount_usd_total, applied_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, clock_timestamp()) ON CONFLICT DO NOTHING",
            (
                identity,
                topic,
                json.dumps(
                    [
                        {"partition": p, "start": s, "end": e}
                        for p, (s, e) in sorted(advance.items())
                    ]
                ),
                run_id,
                fresh.height,
                customers,
                str(total),
            ),
        )
        connection.commit()
        clock.lap("commit")
        return ServingResult(
            fresh.height,
            accepted.height - fresh.height,
            customers,
            history_inserted,
            identity,
            tuple(created),
            clock.laps,
        )


def read_balances(url: str) -> pl.DataFrame:
    """customer_balances as a frame, exact decimals (tests, the CLI, reconciliation)."""
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT customer_id, current_balance::text, currency, last_updated, version "
            "FROM customer_balances ORDER BY customer_id"
        )
        rows = cursor.fetchall()
    return pl.DataFrame(
        rows,
        schema={
            "customer_id": pl.Int64,
            "current_balance": pl.String,
            "currency": pl.String,
            "last_updated": pl.Datetime("us", "UTC"),
            "version": pl.Int64,
        },
        orient="row",
    ).with_columns(pl.col("current_balance").cast(pl.Decimal(12, 2)))
