"""The Postgres serving layer: customer_balances and transaction_history, a projection of
the lake's billing_events that is applied exactly once per Kafka offset.

`balance_offsets` holds, per Kafka partition, the next offset whose billing_events rows are
not yet in Postgres. A batch names the offset range its rows cover, `{partition: (start,
end)}`, and is applied in one transaction (serving_batch.py): the marks are locked, the
rows at or above them inserted into the history, each balance moved by the rows actually
inserted, the marks advanced and the batch recorded in the `balance_batches` ledger.

A rerun, retry or replay of the same offsets finds them below the mark and changes
nothing; a crash before COMMIT changes nothing either, and a commit lost after the fact
(a crash with non-durable commits, a restore from backup) leaves the mark behind the
lake, which the next run or the sensor repairs from billing_events.

Balance semantics: the sum of `amount_usd` of the customer's accepted events, in USD.
PAYMENT adds, REFUND and CHARGEBACK (negative amounts) subtract, ADJUSTMENT adds its
signed amount.

This module holds the frame work and the reads; serving_batch.py the transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime

import polars as pl
import psycopg2
import psycopg2.extensions

from billing_dagster.postgres_db import connect

BALANCE_CURRENCY = "USD"
#: Namespace for transaction ids of events whose event_id is not itself a UUID.
TRANSACTION_NAMESPACE = uuid.UUID("6f1c1d2e-8a4b-4f0e-9a57-0b1e2d3c4f5a")
_UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
#: The ledger's kinds: a batch applied by its own run, or offsets applied from
#: billing_events because the serving marks were behind the lake.
BATCH, REPAIR = "batch", "repair"

#: Offset ranges per Kafka partition: {partition: (start, end)}, end exclusive.
Ranges = Mapping[int, tuple[int, int]]


class ServingGapError(RuntimeError):
    """The serving mark is below the batch's start: applying it would skip offsets."""


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
    """transaction_history's columns, in the table's order (COPY has no column list)."""
    return accepted.select(
        transaction_ids(accepted["event_id"]).alias("transaction_id"),
        "customer_id",
        "amount",
        "transaction_type",
        "created_at",
        "currency",
        "amount_usd",
        "event_id",
        "kafka_topic",
        "kafka_partition",
        "kafka_offset",
    )


def months_of(created_at: pl.Series) -> list[date]:
    return sorted(created_at.dt.truncate("1mo").dt.date().unique().to_list())


def next_month(month: date) -> date:
    return date(month.year + (month.month == 12), month.month % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"transaction_history_{month:%Y%m}"


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
                    (month.isoformat(), next_month(month).isoformat()),
                )
                created.append(name)
    return created


def batch_id(topic: str, applied: Ranges, kind: str = BATCH) -> str:
    """The ledger's key: what was applied, and how (a repair of a batch's range is an
    entry of its own beside the batch's, if that one survived)."""
    identity = json.dumps({"topic": topic, "ranges": sorted(applied.items()), "kind": kind})
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def rows_from(rows: pl.DataFrame, marks: Mapping[int, int]) -> pl.DataFrame:
    """The rows at or above their partition's mark (partitions without a mark: none)."""
    mark_frame = pl.DataFrame(
        {"kafka_partition": list(marks), "_mark": list(marks.values())},
        schema={"kafka_partition": pl.Int32, "_mark": pl.Int64},
    )
    return (
        rows.join(mark_frame, on="kafka_partition", how="inner")
        .filter(pl.col("kafka_offset") >= pl.col("_mark"))
        .drop("_mark")
    )


# ---- the transaction -----------------------------------------------------------------


@dataclass(frozen=True)
class ServingResult:
    events_applied: int
    events_already_applied: int
    customers_updated: int
    history_inserted: int
    batch_id: str | None
    partitions_created: tuple[str, ...]
    #: The offsets this transaction moved the marks over: {partition: (from, to)}.
    applied: dict[int, tuple[int, int]] = field(default_factory=dict)
    amount_usd_applied: str = "0"
    #: Seconds per phase (copy_history, insert_history_and_balances, commit).
    timings: Mapping[str, float] = field(default_factory=dict)


# ---- reading -------------------------------------------------------------------------


def _migrated(cursor: psycopg2.extensions.cursor) -> bool:
    """A database no run has migrated yet holds nothing (the alerts and the sensor may
    look before the first run)."""
    cursor.execute("SELECT to_regclass('balance_batches') IS NOT NULL")
    return cursor.fetchone()[0]


def serving_marks(url: str, topic: str) -> dict[int, int]:
    """Next offset per Kafka partition whose billing_events rows are not yet applied."""
    with connect(url) as connection, connection.cursor() as cursor:
        if not _migrated(cursor):
            return {}
        cursor.execute(
            "SELECT kafka_partition, next_offset FROM balance_offsets WHERE topic = %s", (topic,)
        )
        return dict(cursor.fetchall())


def recent_repairs(url: str, topic: str, since: datetime) -> list[dict[str, object]]:
    """Ledger rows of repairs that applied events (Postgres had lost them) since `since`."""
    with connect(url) as connection, connection.cursor() as cursor:
        if not _migrated(cursor):
            return []
        cursor.execute(
            "SELECT applied_at, offset_ranges, events_applied, amount_usd_total::text "
            "FROM balance_batches WHERE kind = %s AND topic = %s AND events_applied > 0 "
            "AND applied_at >= %s ORDER BY applied_at",
            (REPAIR, topic, since),
        )
        return [
            {
                "applied_at": at.isoformat(),
                "offset_ranges": " ".join(
                    f"{r['partition']}:{r['start']}-{r['end']}" for r in ranges
                ),
                "events_applied": events,
                "amount_usd": total,
            }
            for at, ranges, events, total in cursor.fetchall()
        ]


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
