"""The OLTP billing database: its migrations, writing workload activities into it, and
reading a day of its money rows back for reconciliation."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import polars as pl
import psycopg2.extensions
from psycopg2 import sql

from billing_dagster.contract import EVENT_SCHEMA
from billing_dagster.postgres_db import connect, migrate
from billing_dagster.workload import PRIMARY_KEYS, Activity, RowChange

OLTP_MIGRATIONS_DIR = Path(__file__).parent / "oltp_migrations"
OLTP_SETTING = "BILLING_OLTP_URL"


def connect_oltp(url: str):
    return connect(url, setting=OLTP_SETTING, what="the OLTP database")


def migrate_oltp(url: str) -> list[str]:
    """Create or bring up to date the `billing` schema; returns the migrations applied."""
    return migrate(url, OLTP_MIGRATIONS_DIR, setting=OLTP_SETTING, what="the OLTP database")


def _statement(change: RowChange) -> tuple[sql.Composed, list[object]]:
    table = sql.Identifier("billing", change.table)
    columns = list(change.values)
    if change.op == "insert":
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            table,
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        )
        return statement, [change.values[c] for c in columns]
    if change.op == "update":
        statement = sql.SQL("UPDATE {} SET {} WHERE {} = %s").format(
            table,
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in columns),
            sql.Identifier(PRIMARY_KEYS[change.table]),
        )
        return statement, [*(change.values[c] for c in columns), change.key]
    raise ValueError(f"unknown row change op '{change.op}'")


def write_activities(
    connection: psycopg2.extensions.connection, activities: Iterable[Activity]
) -> int:
    """Apply each activity as one OLTP transaction; returns how many were committed."""
    committed = 0
    for activity in activities:
        with connection, connection.cursor() as cursor:
            for change in activity.changes:
                cursor.execute(*_statement(change))
        committed += 1
    return committed


# Reconciliation reads the money rows as events with its own SQL, independent of the CDC
# mapping in debezium.py, so a mapping bug shows up as a discrepancy instead of hiding.
_DAY_EVENTS = """
SELECT transaction_id::text AS event_id, customer_id, transaction_type, amount, currency,
       created_at
  FROM billing.transactions WHERE created_at >= %(start)s AND created_at < %(end)s
UNION ALL
SELECT payment_id::text, customer_id, 'PAYMENT', amount, currency, created_at
  FROM billing.payments WHERE created_at >= %(start)s AND created_at < %(end)s
UNION ALL
SELECT refund_id::text, customer_id, upper(kind), -amount, currency, created_at
  FROM billing.refunds WHERE created_at >= %(start)s AND created_at < %(end)s
"""

_COLUMNS = ("event_id", "customer_id", "transaction_type", "amount", "currency", "created_at")


def oltp_events_of_day(url: str, day: date) -> pl.DataFrame:
    """The day's (UTC) money rows of the OLTP database, as billing events."""
    start = datetime.combine(day, time(), UTC)
    with connect_oltp(url) as connection, connection.cursor() as cursor:
        cursor.execute(_DAY_EVENTS, {"start": start, "end": start + timedelta(days=1)})
        rows = cursor.fetchall()
    schema = {name: EVENT_SCHEMA[name] for name in _COLUMNS}
    return pl.DataFrame(rows, schema=schema, orient="row")
