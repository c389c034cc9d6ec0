"""Daily reconciliation: real-time revenue (the aggregates) against a batch recomputation
from the source of truth, the raw lake.

The batch side is deliberately a separate path: every delivery in raw/ for the day, less
the deliveries quarantine/ rejected (by Kafka position), one per event_id (the lowest
position), priced in USD from the reference rates, and summed with plain group-bys. The
real-time side is what finance sees: daily_revenue per currency and customer_metrics per
customer. Discrepancy = |realtime - batch| / |batch|, judged exactly on decimals.

Every currency or customer whose amounts differ at all is written to
reconciliation/discrepancies with the events behind the difference (billing_events, which
the aggregates are built from, against the batch set): missing on one side, or different.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import NamedTuple

import polars as pl

from billing_dagster.aggregates import (
    CUSTOMER_METRICS,
    DAILY_REVENUE,
    days_filter,
    events_of_days,
    read_aggregate,
)
from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    DAY_PARTITIONS,
    DISCREPANCIES_TABLE,
    EVENT_SCHEMA,
    MONEY_TOTAL,
    QUARANTINE_TABLE,
    RAW_EVENT_SCHEMA,
    RAW_TABLE,
    RECONCILIATION_TABLE,
)
from billing_dagster.delta_lake import LakeLocation, replace_partition, scan_table
from billing_dagster.enrichment import ReferenceData, enrich

DEFAULT_TOLERANCE_PCT = Decimal("0.1")
PCT = pl.Decimal(24, 6)
PCT_PLACES = Decimal("0.000001")

_POSITION = ("kafka_topic", "kafka_partition", "kafka_offset")

RECONCILIATION_SCHEMA: dict[str, pl.DataType] = {
    "recon_date": pl.Date(),
    #: "currency" (key: the code; amounts in that currency) or "customers" (key "all":
    #: the customer-level check, amounts in USD).
    "scope": pl.String(),
    "key": pl.String(),
    "realtime_revenue": MONEY_TOTAL,
    "batch_revenue": MONEY_TOTAL,
    "realtime_net": MONEY_TOTAL,
    "batch_net": MONEY_TOTAL,
    "realtime_count": pl.Int64(),
    "batch_count": pl.Int64(),
    "discrepancy_pct": PCT,
    "tolerance_pct": PCT,
    "within_tolerance": pl.Boolean(),
    "keys_compared": pl.Int64(),
    "keys_beyond_tolerance": pl.Int64(),
    "differing_events": pl.Int64(),
    "reconciled_at": pl.Datetime("us", "UTC"),
    "run_id": pl.String(),
    **{name: pl.Int32() for name in DAY_PARTITIONS},
}

DISCREPANCIES_SCHEMA: dict[str, pl.DataType] = {
    "recon_date": pl.Date(),
    "scope": pl.String(),
    "key": pl.String(),
    "realtime_net": MONEY_TOTAL,
    "batch_net": MONEY_TOTAL,
    "discrepancy_pct": PCT,
    "within_tolerance": pl.Boolean(),
    #: missing_in_realtime, missing_in_batch, amount_differs, attributes_differ, or
    #: aggregate_drift (the aggregate disagrees with its own events; no event to name).
    "kind": pl.String(),
    "event_id": pl.String(),
    "transaction_type": pl.String(),
    "currency": pl.String(),
    "customer_id": pl.Int64(),
    "created_at": pl.Datetime("us", "UTC"),
    "realtime_amount": MONEY_TOTAL,
    "batch_amount": MONEY_TOTAL,
    "realtime_amount_usd": MONEY_TOTAL,
    "batch_amount_usd": MONEY_TOTAL,
    "kafka_topic": pl.String(),
    "kafka_partition": pl.Int32(),
    "kafka_offset": pl.Int64(),
    "detected_at": pl.Datetime("us", "UTC"),
    "run_id": pl.String(),
    **{name: pl.Int32() for name in DAY_PARTITIONS},
}


# ---- the batch side ---------------------------------------------------------------------


def batch_events(
    lake: LakeLocation, days: Sequence[date], reference: ReferenceData
) -> pl.DataFrame:
    """The events of these days recomputed from raw/: delivered, not rejected, once each."""
    columns = [*EVENT_SCHEMA, *_POSITION]
    raw = scan_table(lake, RAW_TABLE)
    if raw is None:
        return enrich(pl.DataFrame(schema={c: RAW_EVENT_SCHEMA[c] for c in columns}), reference)
    delivered = raw.filter(days_filter(days)).select(columns)
    quarantine = scan_table(lake, QUARANTINE_TABLE)
    if quarantine is not None:
        rejected = quarantine.select(_POSITION).filter(pl.col("kafka_offset").is_not_null())
        delivered = delivered.join(rejected, on=list(_POSITION), how="anti")
    first = (
        delivered.sort(list(_POSITION))
        .unique("event_id", keep="first", maintain_order=True)
        .collect()
    )
    return enrich(first, reference)


def _sum(column: str, where: pl.Expr | None = None) -> pl.Expr:
    value = pl.col(column).cast(MONEY_TOTAL)
    if where is not None:
        value = pl.when(where).then(value)
    return value.sum().cast(MONEY_TOTAL)


_PAYMENT = pl.col("transaction_type") == "PAYMENT"


def batch_totals_by_currency(events: pl.DataFrame) -> pl.DataFrame:
    return events.group_by(key="currency").agg(
        batch_revenue=_sum("amount", _PAYMENT),
        batch_net=_sum("amount"),
        batch_count=pl.len().cast(pl.Int64),
    )


def batch_totals_by_customer(events: pl.DataFrame) -> pl.DataFrame:
    return events.group_by(customer_id="customer_id").agg(
        batch_revenue=_sum("amount_usd", _PAYMENT),
        batch_net=_sum("amount_usd"),
        batch_count=pl.len().cast(pl.Int64),
    )


# ---- comparing --------------------------------------------------------------------------


def discrepancy_pct(realtime: Decimal, batch: Decimal) -> Decimal | None:
    """|realtime - batch| / |batch| in percent; None when batch is 0 and realtime is not."""
    diff = abs(realtime - batch)
    if batch == 0:
        return Decimal(0) if diff == 0 else None
    return (diff / abs(batch) * 100).quantize(PCT_PLACES)


def within_tolerance(realtime: Decimal, batch: Decimal, tolerance_pct: Decimal) -> bool:
    """Exact: |realtime - batch| * 100 <= tolerance * |batch| (no rounded percentages)."""
    return abs(realtime - batch) * 100 <= tolerance_pct * abs(batch)


def compare(
    realtime: pl.DataFrame, batch: pl.DataFrame, on: str, tolerance_pct: Decimal
) -> pl.DataFrame:
    """One row per key present on either side, with both sides' revenue, net and count,
    the discrepancy (the worse of revenue and net) and whether it is within tolerance."""
    zero = pl.lit(Decimal(0), MONEY_TOTAL)
    joined = realtime.join(batch, on=on, how="full", coalesce=True).with_columns(
        pl.col("realtime_revenue", "batch_revenue", "realtime_net", "batch_net").fill_null(zero),
        pl.col("realtime_count", "batch_count").fill_null(0),
    )
    rows = []
    for row in joined.iter_rows(named=True):
        pairs = [
            (row["realtime_revenue"], row["batch_revenue"]),
            (row["realtime_net"], row["batch_net"]),
        ]
        pcts = [discrepancy_pct(r, b) for r, b in pairs]
        worst = None if None in pcts else max(pcts)  # type: ignore[type-var]
        within = all(within_tolerance(r, b, tolerance_pct) for r, b in pairs)
        rows.append({**row, "discrepancy_pct": worst, "within_tolerance": within})
    schema = {**joined.schema, "discrepancy_pct": PCT, "within_tolerance": pl.Boolean()}
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def event_differences(realtime: pl.DataFrame, batch: pl.DataFrame) -> pl.DataFrame:
    """Events present on one side only, or different between the sides."""
    keep = ["event_id", "transaction_type", "currency", "customer_id", "created_at"]
    rt = realtime.select(
        *keep, realtime_amount="amount", realtime_amount_usd="amount_usd"
    ).with_columns(_rt=pl.lit(True))
    bt = batch.select(
        *keep, *_POSITION, batch_amount="amount", batch_amount_usd="amount_usd"
    ).with_columns(_bt=pl.lit(True))
    joined = rt.join(bt, on="event_id", how="full", coalesce=True, suffix="_batch")
    kind = (
        pl.when(pl.col("_rt").is_null())
        .then(pl.lit("missing_in_realtime"))
        .when(pl.col("_bt").is_null())
        .then(pl.lit("missing_in_batch"))
        .when(
            (pl.col("realtime_amount") != pl.col("batch_amount"))
            | (pl.col("realtime_amount_usd") != pl.col("batch_amount_usd"))
        )
        .then(pl.lit("amount_differs"))
        .when(
            pl.any_horizontal(
                [pl.col(c).ne_missing(pl.col(f"{c}_batch")) for c in keep if c != "event_id"]
            )
        )
        .then(pl.lit("attributes_differ"))
    )
    return (
        joined.with_columns(kind=kind)
        .filter(pl.col("kind").is_not_null())
        .with_columns(
            # Attribute events to the batch side's key when the realtime side lacks them.
            *[pl.coalesce(c, f"{c}_batch").alias(c) for c in keep if c != "event_id"]
        )
        .drop([f"{c}_batch" for c in keep if c != "event_id"], "_rt", "_bt")
        .sort("created_at", "event_id")
    )


# ---- the result -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconciliationResult:
    day: date
    tolerance_pct: Decimal
    #: reconciliation/daily rows (one per currency, one for the customer check).
    summary: pl.DataFrame
    #: reconciliation/discrepancies rows.
    discrepancies: pl.DataFrame
    customers_beyond_tolerance: int

    @property
    def within_tolerance(self) -> bool:
        return bool(self.summary["within_tolerance"].all()) if self.summary.height else True

    @property
    def max_discrepancy_pct(self) -> Decimal | None:
        """The worst discrepancy of any currency or customer; None when a side is 0 and the
        other is not (an unbounded discrepancy)."""
        if self.summary.is_empty():
            return Decimal(0)
        if self.summary["discrepancy_pct"].null_count():
            return None
        return self.summary["discrepancy_pct"].max()  # type: ignore[return-value]

    @property
    def status(self) -> str:
        if self.summary.filter(pl.col("scope") == "currency").is_empty():
            return "no_data"
        return "reconciled" if self.within_tolerance else "mismatch"

    def metadata(self) -> dict[str, object]:
        worst = self.max_discrepancy_pct
        currencies = self.summary.filter(pl.col("scope") == "currency")
        return {
            "status": self.status,
            "max_discrepancy_pct": "unbounded" if worst is None else f"{worst:.6f}",
            "tolerance_pct": str(self.tolerance_pct),
            "currencies": {
                r["key"]: {
                    "realtime_revenue": str(r["realtime_revenue"]),
                    "batch_revenue": str(r["batch_revenue"]),
                    "realtime_net": str(r["realtime_net"]),
                    "batch_net": str(r["batch_net"]),
                    "discrepancy_pct": None
                    if r["discrepancy_pct"] is None
                    else str(r["discrepancy_pct"]),
                }
                for r in currencies.iter_rows(named=True)
            },
            "customers_beyond_tolerance": self.customers_beyond_tolerance,
            "discrepancy_rows": self.discrepancies.height,
            "differing_events": sorted(
                {e for e in self.discrepancies["event_id"].to_list() if e is not None}
            )[:20],
        }


def reconcile_day(
    lake: LakeLocation,
    day: date,
    reference: ReferenceData,
    *,
    tolerance_pct: Decimal = DEFAULT_TOLERANCE_PCT,
    run_id: str = "",
    now: datetime | None = None,
) -> ReconciliationResult:
    """The day's real-time revenue against its batch recomputation from raw/: per currency,
    and per customer in USD, with the events behind every difference."""
    now = now or datetime.now(UTC)
    batch = batch_events(lake, [day], reference)
    realtime = _read_realtime(lake, day, batch)
    currencies = compare(
        realtime.by_currency, batch_totals_by_currency(batch), "key", tolerance_pct
    )
    customers = compare(
        realtime.by_customer, batch_totals_by_customer(batch), "customer_id", tolerance_pct
    )
    differences = event_differences(realtime.events, batch)
    currency_mismatches, customer_mismatches = _mismatches(currencies), _mismatches(customers)
    stamp = _day_stamp(day, run_id)
    discrepancies = _discrepancies(
        currency_mismatches, customer_mismatches, differences, stamp=stamp, now=now
    )
    summary = _summary(
        _currency_summary(currencies, differences),
        _customer_summary(customers, customer_mismatches, differences),
        stamp=stamp,
        tolerance_pct=tolerance_pct,
        now=now,
    )
    beyond = customers.filter(~pl.col("within_tolerance")).height
    return ReconciliationResult(day, tolerance_pct, summary, discrepancies, beyond)


# ---- the real-time side -----------------------------------------------------------------


class _RealtimeSide(NamedTuple):
    #: The day's billing_events, which the aggregates are built from.
    events: pl.DataFrame
    #: daily_revenue of the day, named as compare() expects.
    by_currency: pl.DataFrame
    #: customer_metrics of the day (USD), named as compare() expects.
    by_customer: pl.DataFrame


def _read_realtime(lake: LakeLocation, day: date, batch: pl.DataFrame) -> _RealtimeSide:
    """What finance sees for the day, and the events behind it; before billing_events
    exists there are no events (shaped like `batch`, so the sides still compare)."""
    source = lake.open(BILLING_EVENTS_TABLE)
    events = (
        events_of_days(lake, [day], source.version())
        if source is not None
        else batch.clear().select(EVENT_SCHEMA.keys()).with_columns(amount_usd=pl.col("amount"))
    )
    by_currency = read_aggregate(lake, DAILY_REVENUE, [day]).select(
        key="currency",
        realtime_revenue="gross_revenue",
        realtime_net="net_revenue",
        realtime_count="transaction_count",
    )
    by_customer = read_aggregate(lake, CUSTOMER_METRICS, [day]).select(
        "customer_id",
        realtime_revenue="payments_usd",
        realtime_net="net_usd",
        realtime_count="transaction_count",
    )
    return _RealtimeSide(events, by_currency, by_customer)


# ---- building the result ----------------------------------------------------------------


def _mismatches(compared: pl.DataFrame) -> pl.DataFrame:
    """The compared keys whose amounts differ at all, within tolerance or not: each one is
    explained in reconciliation/discrepancies."""
    return compared.filter(
        (pl.col("realtime_net") != pl.col("batch_net"))
        | (pl.col("realtime_revenue") != pl.col("batch_revenue"))
        | (pl.col("realtime_count") != pl.col("batch_count"))
    )


def _day_stamp(day: date, run_id: str) -> dict[str, pl.Expr]:
    """The columns naming the reconciled day and run, in both tables."""
    return {
        "recon_date": pl.lit(day, pl.Date),
        "year": pl.lit(day.year, pl.Int32),
        "month": pl.lit(day.month, pl.Int32),
        "day": pl.lit(day.day, pl.Int32),
        "run_id": pl.lit(run_id),
    }


def _discrepancies(
    currency_mismatches: pl.DataFrame,
    customer_mismatches: pl.DataFrame,
    differences: pl.DataFrame,
    *,
    stamp: dict[str, pl.Expr],
    now: datetime,
) -> pl.DataFrame:
    """reconciliation/discrepancies rows: each mismatching currency and customer with the
    events behind the difference."""
    if not (currency_mismatches.height or customer_mismatches.height):
        return pl.DataFrame(schema=DISCREPANCIES_SCHEMA)
    detailed = pl.concat(
        [
            _detail_rows(
                currency_mismatches,
                differences,
                scope="currency",
                key_column="key",
                event_column="currency",
            ),
            _detail_rows(
                customer_mismatches,
                differences,
                scope="customer",
                key_column="customer_id",
                event_column="customer_id",
            ),
        ],
        how="diagonal_relaxed",
    )
    return _conform(
        detailed.with_columns(**stamp, detected_at=pl.lit(now, pl.Datetime("us", "UTC"))),
        DISCREPANCIES_SCHEMA,
    )


def _detail_rows(
    mismatches: pl.DataFrame,
    differences: pl.DataFrame,
    *,
    scope: str,
    key_column: str,
    event_column: str,
) -> pl.DataFrame:
    """Each mismatching key joined to its differing events (or one aggregate_drift row)."""
    keyed = mismatches.rename({key_column: "_key"}).select(
        "_key",
        realtime_net="realtime_net",
        batch_net="batch_net",
        discrepancy_pct="discrepancy_pct",
        within_tolerance="within_tolerance",
    )
    events = differences.with_columns(_key=pl.col(event_column))
    detailed = keyed.join(events, on="_key", how="left").with_columns(
        kind=pl.col("kind").fill_null("aggregate_drift"),
        scope=pl.lit(scope),
        key=pl.col("_key").cast(pl.String),
    )
    return detailed.with_columns(pl.col("_key").alias(event_column)).drop("_key")


def _currency_summary(currencies: pl.DataFrame, differences: pl.DataFrame) -> pl.DataFrame:
    """One summary row per currency: its comparison and the events that differ in it."""
    return (
        currencies.with_columns(
            scope=pl.lit("currency"),
            keys_compared=pl.lit(1, pl.Int64),
            keys_beyond_tolerance=(~pl.col("within_tolerance")).cast(pl.Int64),
        )
        .join(
            differences.group_by(key="currency").agg(differing_events=pl.len().cast(pl.Int64)),
            on="key",
            how="left",
        )
        .with_columns(pl.col("differing_events").fill_null(0))
    )


def _customer_summary(
    customers: pl.DataFrame, customer_mismatches: pl.DataFrame, differences: pl.DataFrame
) -> pl.DataFrame:
    """The one "customers"/"all" summary row: the customer comparisons added up, the worst
    discrepancy of any customer, and within tolerance only if every customer is."""
    beyond = customers.filter(~pl.col("within_tolerance"))
    customer_pcts = customers["discrepancy_pct"]
    return pl.DataFrame(
        {
            "key": ["all"],
            "realtime_revenue": [customers["realtime_revenue"].sum()],
            "batch_revenue": [customers["batch_revenue"].sum()],
            "realtime_net": [customers["realtime_net"].sum()],
            "batch_net": [customers["batch_net"].sum()],
            "realtime_count": [int(customers["realtime_count"].sum())],
            "batch_count": [int(customers["batch_count"].sum())],
            "discrepancy_pct": [
                None if customer_pcts.null_count() else (customer_pcts.max() or Decimal(0))
            ],
            "within_tolerance": [beyond.is_empty()],
            "keys_compared": [customers.height],
            "keys_beyond_tolerance": [beyond.height],
            "differing_events": [
                differences.filter(
                    pl.col("customer_id").is_in(customer_mismatches["customer_id"].implode())
                ).height
            ],
        },
        schema_overrides={
            "realtime_revenue": MONEY_TOTAL,
            "batch_revenue": MONEY_TOTAL,
            "realtime_net": MONEY_TOTAL,
            "batch_net": MONEY_TOTAL,
            "discrepancy_pct": PCT,
        },
    ).with_columns(scope=pl.lit("customers"))


def _summary(
    currency_summary: pl.DataFrame,
    customer_summary: pl.DataFrame,
    *,
    stamp: dict[str, pl.Expr],
    tolerance_pct: Decimal,
    now: datetime,
) -> pl.DataFrame:
    """reconciliation/daily rows, sorted by scope and key."""
    summary = pl.concat([currency_summary, customer_summary], how="diagonal_relaxed")
    return _conform(
        summary.with_columns(
            **stamp,
            tolerance_pct=pl.lit(tolerance_pct, PCT),
            reconciled_at=pl.lit(now, pl.Datetime("us", "UTC")),
        ).sort("scope", "key"),
        RECONCILIATION_SCHEMA,
    )


def _conform(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    if frame.is_empty():
        return pl.DataFrame(schema=schema)
    missing = [pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in frame]
    return frame.with_columns(missing).select(list(schema)).cast(schema)  # type: ignore[arg-type]


def write_reconciliation(lake: LakeLocation, result: ReconciliationResult) -> None:
    """Replace the day's rows in both tables: a rerun overwrites, never appends."""
    day = {"year": result.day.year, "month": result.day.month, "day": result.day.day}
    for name, rows in (
        (RECONCILIATION_TABLE, result.summary),
        (DISCREPANCIES_TABLE, result.discrepancies),
    ):
        replace_partition(lake, name, rows, day, partition_by=DAY_PARTITIONS)


@dataclass(frozen=True)
class LatestReconciliation:
    day: date
    #: The worst discrepancy of the day; Infinity when one side is 0 and the other not.
    max_discrepancy_pct: Decimal
    worst: str


def latest_reconciliation(lake: LakeLocation) -> LatestReconciliation | None:
    """The most recent day in reconciliation/daily and its worst currency or customer check."""
    scan = scan_table(lake, RECONCILIATION_TABLE)
    if scan is None:
        return None
    rows = scan.filter(pl.col("recon_date") == pl.col("recon_date").max()).collect()
    if rows.is_empty():
        return None
    day = rows["recon_date"][0]
    # A null discrepancy is unbounded (batch 0, real time not): the worst of all.
    worst = rows.sort("discrepancy_pct", descending=True, nulls_last=False).row(0, named=True)
    pct = worst["discrepancy_pct"]
    return LatestReconciliation(
        day=day,  # type: ignore[arg-type]
        max_discrepancy_pct=Decimal("Infinity") if pct is None else pct,
        worst=f"{worst['scope']} {worst['key']}",
    )
