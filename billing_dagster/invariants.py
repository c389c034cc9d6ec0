"""The serving layer's invariants, checked against the lake all the time.

1. Per customer, `customer_balances.current_balance` = the sum of its
   `transaction_history.amount_usd` (true by construction: a balance only ever moves by
   the history rows a transaction inserted).
2. Per event day, transaction_history's count and USD sum = billing_events' (Postgres is
   the projection of billing_events, nothing more, nothing less).
3. Once the pipeline is drained, Postgres' marks = the lake's decided marks per partition.

Each returns an `InvariantResult`; the asset checks (assets/invariant_checks.py), the
`billing-dagster reconcile` command and the alerts read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

import polars as pl

from billing_dagster.contract import BILLING_EVENTS_TABLE
from billing_dagster.delta_lake import LakeLocation, partition_filter, scan_table
from billing_dagster.postgres_db import connect
from billing_dagster.projection import decided_marks
from billing_dagster.serving import serving_marks

BALANCES_EQUAL_HISTORY = "balances_equal_history"
HISTORY_MATCHES_BILLING_EVENTS = "history_matches_billing_events"
MARKS_MATCH_LAKE = "serving_marks_match_lake"
#: How many offending rows a result lists (the count is always complete).
SHOWN = 20


@dataclass(frozen=True)
class InvariantResult:
    name: str
    ok: bool
    summary: str
    #: Offending rows (at most SHOWN), JSON-ready.
    details: list[dict[str, object]] = field(default_factory=list)


_BALANCE_VS_HISTORY = """
WITH history AS (
    SELECT customer_id, sum(amount_usd) AS total, count(*) AS events
    FROM transaction_history GROUP BY customer_id
)
SELECT customer_id, coalesce(b.current_balance, 0)::text, coalesce(h.total, 0)::text,
       coalesce(h.events, 0)
FROM customer_balances AS b FULL JOIN history AS h USING (customer_id)
WHERE coalesce(b.current_balance, 0) <> coalesce(h.total, 0)
ORDER BY customer_id
"""


def balances_equal_history(url: str) -> InvariantResult:
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(_BALANCE_VS_HISTORY)
        rows = cursor.fetchall()
        cursor.execute("SELECT count(*) FROM customer_balances")
        customers = cursor.fetchone()[0]
    details = [
        {"customer_id": c, "balance": b, "history_sum": h, "history_rows": n}
        for c, b, h, n in rows[:SHOWN]
    ]
    summary = (
        f"all {customers:,} balances equal the sum of their history rows"
        if not rows
        else f"{len(rows):,} of {customers:,} balances differ from the sum of their history"
    )
    return InvariantResult(BALANCES_EQUAL_HISTORY, not rows, summary, details)


def _history_by_day(url: str, days: Sequence[date] | None) -> pl.DataFrame:
    where = "" if days is None else "WHERE (created_at AT TIME ZONE 'UTC')::date = ANY(%s)"
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT (created_at AT TIME ZONE 'UTC')::date, count(*), sum(amount_usd)::text "
            f"FROM transaction_history {where} GROUP BY 1",
            () if days is None else (list(days),),
        )
        rows = cursor.fetchall()
    return pl.DataFrame(
        rows,
        schema={"day": pl.Date, "history_count": pl.Int64, "history_usd": pl.String},
        orient="row",
    )


def _lake_by_day(lake: LakeLocation, days: Sequence[date] | None) -> pl.DataFrame:
    scan = scan_table(lake, BILLING_EVENTS_TABLE)
    empty = pl.DataFrame(schema={"day": pl.Date, "lake_count": pl.Int64, "lake_usd": pl.String})
    if scan is None:
        return empty
    if days is not None:
        scan = scan.filter(
            partition_filter(("year", "month", "day"), [(d.year, d.month, d.day) for d in days])
        )
    return (
        scan.group_by(pl.col("created_at").dt.date().alias("day"))
        .agg(pl.len().cast(pl.Int64).alias("lake_count"), pl.col("amount_usd").sum())
        .collect()
        .select("day", "lake_count", pl.col("amount_usd").cast(pl.String).alias("lake_usd"))
    )


def history_matches_billing_events(
    url: str, lake: LakeLocation, days: Sequence[date] | None = None
) -> InvariantResult:
    """Per event day (all days, or `days`): count and USD sum on both sides."""
    both = _history_by_day(url, days).join(
        _lake_by_day(lake, days), on="day", how="full", coalesce=True
    )
    rows = [
        {
            "day": row["day"].isoformat(),
            "history_count": row["history_count"] or 0,
            "lake_count": row["lake_count"] or 0,
            "history_usd": row["history_usd"] or "0",
            "lake_usd": row["lake_usd"] or "0",
        }
        for row in both.sort("day").iter_rows(named=True)
    ]
    wrong = [
        r
        for r in rows
        if r["history_count"] != r["lake_count"]
        or Decimal(r["history_usd"]) != Decimal(r["lake_usd"])
    ]
    summary = (
        f"{len(rows)} event days: transaction_history = billing_events (count and USD sum)"
        if not wrong
        else f"{len(wrong)} of {len(rows)} event days differ between transaction_history "
        f"and billing_events: {', '.join(r['day'] for r in wrong[:5])}"
    )
    return InvariantResult(HISTORY_MATCHES_BILLING_EVENTS, not wrong, summary, wrong[:SHOWN])


def marks_match_lake(
    url: str, lake: LakeLocation, topic: str, partitions: Sequence[int]
) -> InvariantResult:
    """Meaningful once the pipeline is drained (no ingest run in flight)."""
    lake_marks = {p: m for p, m in decided_marks(lake, topic, partitions).items() if m is not None}
    serving = serving_marks(url, topic)
    wrong = [
        {"partition": p, "lake": m, "serving": serving.get(p, 0)}
        for p, m in sorted(lake_marks.items())
        if serving.get(p, 0) != m
    ]
    summary = (
        f"Postgres holds every offset the lake decided on {len(lake_marks)} partitions of {topic}"
        if not wrong
        else f"Postgres marks differ from the lake's on {len(wrong)} partitions of {topic}: "
        + ", ".join(f"{w['partition']}: {w['serving']} vs {w['lake']}" for w in wrong[:5])
    )
    return InvariantResult(MARKS_MATCH_LAKE, not wrong, summary, wrong[:SHOWN])


def check_all(
    url: str,
    lake: LakeLocation,
    topic: str,
    partitions: Sequence[int],
    days: Sequence[date] | None = None,
) -> list[InvariantResult]:
    return [
        balances_equal_history(url),
        history_matches_billing_events(url, lake, days),
        marks_match_lake(url, lake, topic, partitions),
    ]
