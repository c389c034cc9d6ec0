"""Reconciliation against the OLTP source: the day's money rows in the billing database
(read with independent SQL, see oltp.py) against billing_events in the lake.

Per currency: revenue (payments), net and count on both sides, judged with the daily
reconciliation's exact tolerance. Per event: rows missing on either side or differing in
amount or attributes. After CDC has caught up, both must be zero; a day still in flight
shows the rows not yet delivered as missing_in_lake.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

import polars as pl

from billing_dagster.aggregates import events_of_days
from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    DAY_PARTITIONS,
    EVENT_SCHEMA,
    MONEY_TOTAL,
    OLTP_RECONCILIATION_TABLE,
)
from billing_dagster.delta_lake import LakeLocation, replace_partition
from billing_dagster.oltp import oltp_events_of_day
from billing_dagster.reconciliation import PCT, batch_totals_by_currency, compare

_ATTRIBUTES = ("customer_id", "transaction_type", "currency")

OLTP_RECONCILIATION_SCHEMA: dict[str, pl.DataType] = {
    "recon_date": pl.Date(),
    "currency": pl.String(),
    "lake_revenue": MONEY_TOTAL,
    "oltp_revenue": MONEY_TOTAL,
    "lake_net": MONEY_TOTAL,
    "oltp_net": MONEY_TOTAL,
    "lake_count": pl.Int64(),
    "oltp_count": pl.Int64(),
    "discrepancy_pct": PCT,
    "within_tolerance": pl.Boolean(),
    "differing_events": pl.Int64(),
    "reconciled_at": pl.Datetime("us", "UTC"),
    **{name: pl.Int32() for name in DAY_PARTITIONS},
}


def oltp_event_differences(lake_events: pl.DataFrame, oltp_events: pl.DataFrame) -> pl.DataFrame:
    """event_id, kind (missing_in_lake, missing_in_oltp, amount_differs, attributes_differ),
    both amounts and the event's attributes."""
    columns = ["event_id", *_ATTRIBUTES, "amount", "created_at"]
    joined = (
        lake_events.select(columns)
        .with_columns(_lake=pl.lit(True))
        .join(
            oltp_events.select(columns).with_columns(_oltp=pl.lit(True)),
            on="event_id",
            how="full",
            coalesce=True,
            suffix="_oltp",
        )
    )
    kind = (
        pl.when(pl.col("_lake").is_null())
        .then(pl.lit("missing_in_lake"))
        .when(pl.col("_oltp").is_null())
        .then(pl.lit("missing_in_oltp"))
        .when(pl.col("amount") != pl.col("amount_oltp"))
        .then(pl.lit("amount_differs"))
        .when(pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_oltp")) for c in _ATTRIBUTES]))
        .then(pl.lit("attributes_differ"))
    )
    return (
        joined.with_columns(kind=kind)
        .filter(pl.col("kind").is_not_null())
        .select(
            "event_id",
            "kind",
            *[pl.coalesce(c, f"{c}_oltp").alias(c) for c in (*_ATTRIBUTES, "created_at")],
            lake_amount="amount",
            oltp_amount="amount_oltp",
        )
        .sort("created_at", "event_id")
    )


@dataclass(frozen=True)
class OltpReconciliation:
    day: date
    tolerance_pct: Decimal
    #: reconciliation/oltp rows, one per currency on either side.
    summary: pl.DataFrame
    differences: pl.DataFrame

    @property
    def within_tolerance(self) -> bool:
        return bool(self.summary["within_tolerance"].all()) if self.summary.height else True

    @property
    def status(self) -> str:
        if self.summary.is_empty():
            return "no_data"
        if self.differences.is_empty() and self.within_tolerance:
            return "reconciled"
        return "within_tolerance" if self.within_tolerance else "mismatch"

    def metadata(self) -> dict[str, object]:
        pcts = self.summary["discrepancy_pct"]
        worst = "unbounded" if pcts.null_count() else f"{pcts.max() or Decimal(0):.6f}"
        return {
            "status": self.status,
            "max_discrepancy_pct": worst,
            "tolerance_pct": str(self.tolerance_pct),
            "oltp_events": int(self.summary["oltp_count"].sum()),
            "lake_events": int(self.summary["lake_count"].sum()),
            "differing_events": self.differences.height,
            "by_kind": dict(self.differences["kind"].value_counts().iter_rows()),
            "currencies": {
                r["currency"]: {"lake_net": str(r["lake_net"]), "oltp_net": str(r["oltp_net"])}
                for r in self.summary.iter_rows(named=True)
            },
            "examples": self.differences.head(10).select("event_id", "kind").to_dicts(),
        }


def reconcile_oltp_day(
    lake: LakeLocation,
    oltp_url: str,
    day: date,
    *,
    tolerance_pct: Decimal,
    now: datetime | None = None,
) -> OltpReconciliation:
    oltp = oltp_events_of_day(oltp_url, day)
    source = lake.open(BILLING_EVENTS_TABLE)
    lake_events = (
        events_of_days(lake, [day], source.version())
        if source is not None
        else pl.DataFrame(schema=EVENT_SCHEMA)
    )
    # The same per-currency sums as the daily reconciliation's batch side, on both sides.
    lake_totals = batch_totals_by_currency(lake_events).rename(
        {f"batch_{m}": f"realtime_{m}" for m in ("revenue", "net", "count")}
    )
    compared = compare(lake_totals, batch_totals_by_currency(oltp), "key", tolerance_pct)
    differences = oltp_event_differences(lake_events, oltp)
    per_currency = differences.group_by(key="currency").agg(
        differing_events=pl.len().cast(pl.Int64)
    )
    summary = (
        compared.join(per_currency, on="key", how="left")
        .select(
            currency="key",
            lake_revenue="realtime_revenue",
            oltp_revenue="batch_revenue",
            lake_net="realtime_net",
            oltp_net="batch_net",
            lake_count="realtime_count",
            oltp_count="batch_count",
            discrepancy_pct="discrepancy_pct",
            within_tolerance="within_tolerance",
            differing_events=pl.col("differing_events").fill_null(0),
        )
        .with_columns(
            recon_date=pl.lit(day, pl.Date),
            reconciled_at=pl.lit(now or datetime.now(UTC), pl.Datetime("us", "UTC")),
            year=pl.lit(day.year, pl.Int32),
            month=pl.lit(day.month, pl.Int32),
            day=pl.lit(day.day, pl.Int32),
        )
        .select(list(OLTP_RECONCILIATION_SCHEMA))
        .cast(OLTP_RECONCILIATION_SCHEMA)  # type: ignore[arg-type]
        .sort("currency")
    )
    return OltpReconciliation(day, tolerance_pct, summary, differences)


def write_oltp_reconciliation(lake: LakeLocation, result: OltpReconciliation) -> None:
    """Replace the day's rows of reconciliation/oltp: a rerun overwrites, never appends."""
    day = {"year": result.day.year, "month": result.day.month, "day": result.day.day}
    replace_partition(
        lake, OLTP_RECONCILIATION_TABLE, result.summary, day, partition_by=DAY_PARTITIONS
    )
