"""What was accepted before: the billing_events rows sharing an event_id with a batch,
whatever their Kafka timestamp, event hour or day, within the dedupe horizon.

A redelivery need not carry `created_at`: event time then falls back to the Kafka
timestamp, which a re-send moves to a later hour or day. So the lookup spans the batch's
event times widened by the horizon on both sides.

Two lookups give the same answer:
- `accepted_before_in_serving`: transaction_history in Postgres, the projection of
  billing_events, caught up to the lake's decided offsets before the batch is decided
  (`projection.catch_up`). Its primary key (transaction_id, created_at) makes this an index
  probe per event: the cost follows the batch, not the history. This is the pipeline's.
- `accepted_before_in_lake`: a scan of billing_events over the horizon's days, for runs
  without Postgres (the lake-only benchmarks) and as the reference in tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta

import polars as pl
import psycopg2.extensions

from billing_dagster.cleaning import PRIOR_COLUMNS
from billing_dagster.contract import BILLING_EVENTS_SCHEMA, BILLING_EVENTS_TABLE
from billing_dagster.delta_lake import LakeLocation, partition_filter, scan_table
from billing_dagster.postgres_db import connect
from billing_dagster.serving import ServingGapError, transaction_ids

DEFAULT_HORIZON = timedelta(days=7)
PRIOR_SCHEMA: dict[str, pl.DataType] = {c: BILLING_EVENTS_SCHEMA[c] for c in PRIOR_COLUMNS}


def horizon_window(events: pl.DataFrame, horizon: timedelta) -> tuple[datetime, datetime]:
    """[earliest event - horizon, latest event + horizon]: where an earlier delivery of any
    of these events can sit (a producer's clock may also run behind)."""
    created = events["created_at"]
    return created.min() - horizon, created.max() + horizon


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=PRIOR_SCHEMA)


_SERVING_LOOKUP = """
SELECT transaction_id::text, kafka_topic, kafka_partition, kafka_offset, customer_id,
       transaction_type::text, amount::text, currency
FROM transaction_history
WHERE transaction_id = ANY(%s::uuid[]) AND created_at >= %s AND created_at <= %s
"""


class ServingBehindError(ServingGapError):
    """transaction_history does not hold every offset the lake decided: Postgres lost
    commits (a crash with non-durable settings, a failover) since it was caught up."""


def accepted_before_in_serving(
    url: str,
    events: pl.DataFrame,
    horizon: timedelta = DEFAULT_HORIZON,
    *,
    topic: str | None = None,
    caught_up_to: Mapping[int, int | None] | None = None,
) -> pl.DataFrame:
    """Earlier deliveries of the batch's event_ids, from transaction_history.

    Matched on transaction_id (a UUID event_id in any case, or the uuid5 of another), and
    returned under the batch's own event_id. `caught_up_to`: the lake's decided marks of
    `topic`; the lookup reads the marks in the same snapshot as the history and raises
    ServingBehindError if Postgres is behind them (it lost the catch-up's commit)."""
    if events.is_empty():
        return _empty()
    ids = events.select("event_id").unique()
    ids = ids.with_columns(transaction_ids(ids["event_id"]).alias("transaction_id"))
    low, high = horizon_window(events, horizon)
    # The ids go as one array literal: 100K separate literals cost seconds to parse and plan.
    ids_literal = "{" + ",".join(ids["transaction_id"].to_list()) + "}"
    with connect(url) as connection, connection.cursor() as cursor:
        # One snapshot for the marks and the history: what the marks say is what is read.
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        if caught_up_to:
            _check_caught_up(cursor, topic or "", caught_up_to)
        # For a large batch the planner prices 100K index probes above a scan of the
        # months in the window, and a scan is exactly the cost that must not grow with
        # the history: probe the (transaction_id, created_at) key, always.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        cursor.execute(_SERVING_LOOKUP, (ids_literal, low, high))
        rows = cursor.fetchall()
    found = pl.DataFrame(
        rows,
        schema={
            "transaction_id": pl.String,
            "kafka_topic": pl.String,
            "kafka_partition": pl.Int32,
            "kafka_offset": pl.Int64,
            "customer_id": pl.Int64,
            "transaction_type": pl.String,
            "amount": pl.String,
            "currency": pl.String,
        },
        orient="row",
    )
    return ids.join(found, on="transaction_id").select(PRIOR_COLUMNS).cast(PRIOR_SCHEMA)


def _check_caught_up(
    cursor: psycopg2.extensions.cursor, topic: str, needed: Mapping[int, int | None]
) -> None:
    cursor.execute(
        "SELECT kafka_partition, next_offset FROM balance_offsets WHERE topic = %s", (topic,)
    )
    marks = dict(cursor.fetchall())
    behind = {
        p: (marks.get(p, 0), mark)
        for p, mark in sorted(needed.items())
        if mark is not None and marks.get(p, 0) < mark
    }
    if behind:
        raise ServingBehindError(
            f"Postgres lost offsets of {topic} it had been caught up to: "
            + ", ".join(f"{p}:{m}-{d}" for p, (m, d) in behind.items())
        )


def _days(low: datetime, high: datetime) -> list[date]:
    first, last = low.date(), high.date()
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def accepted_before_in_lake(
    lake: LakeLocation, events: pl.DataFrame, horizon: timedelta = DEFAULT_HORIZON
) -> pl.DataFrame:
    """Earlier deliveries of the batch's event_ids, from billing_events (the days of the
    horizon window only)."""
    scan = scan_table(lake, BILLING_EVENTS_TABLE)
    if scan is None or events.is_empty():
        return _empty()
    days = _days(*horizon_window(events, horizon))
    return (
        scan.filter(
            partition_filter(("year", "month", "day"), [(d.year, d.month, d.day) for d in days])
        )
        .filter(pl.col("event_id").is_in(events["event_id"].unique().implode()))
        .select(PRIOR_COLUMNS)
        .collect()
        .cast(PRIOR_SCHEMA)
    )
