"""Revenue aggregates over billing_events: hourly_revenue, daily_revenue, customer_metrics.

Incremental and exactly-once without per-event state:
- each aggregate table records, in a Delta application transaction committed with its
  MERGE, the billing_events version it reflects;
- a refresh diffs billing_events' file list between that version and now: the partitions
  (event hours) of added or removed files are the days touched since;
- every touched day is recomputed from billing_events and MERGEd (insert, update changed
  rows, delete rows whose events vanished). Aggregates are therefore a pure function of
  billing_events: replays, reruns and crashes cannot double-count, and a lost refresh is
  repaired by the next one.

Late events (the reference design's 5 s watermark): an event is late when its created_at is
behind the newest event time billing_events held before its batch, less the allowed
lateness. It still lands in its own hour (the hour is recomputed); hourly_revenue counts
such payments per hour in late_event_count, and each refresh reports how many it absorbed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    CUSTOMER_METRICS_SCHEMA,
    CUSTOMER_METRICS_TABLE,
    DAILY_REVENUE_SCHEMA,
    DAILY_REVENUE_TABLE,
    DAY_PARTITIONS,
    EVENT_HOUR_PARTITIONS,
    HOURLY_REVENUE_SCHEMA,
    HOURLY_REVENUE_TABLE,
    MONEY_TOTAL,
)
from billing_dagster.delta_lake import (
    LakeLocation,
    partition_filter,
    partition_predicate,
    scan_table,
)

#: App id under which each aggregate table records the billing_events version it reflects.
SOURCE_APP_ID = "source:billing_events"
DEFAULT_ALLOWED_LATENESS = timedelta(seconds=5)

#: What the aggregates read from billing_events.
AGGREGATE_INPUT_COLUMNS = (
    "event_id",
    "customer_id",
    "transaction_type",
    "amount",
    "currency",
    "amount_usd",
    "created_at",
)


@dataclass(frozen=True, eq=False)  # identity: the three tables are singletons
class AggregateTable:
    name: str
    schema: dict[str, pl.DataType]
    key: tuple[str, ...]
    #: Columns a MERGE compares to decide whether a row really changed.
    values: tuple[str, ...]


HOURLY_REVENUE = AggregateTable(
    HOURLY_REVENUE_TABLE,
    HOURLY_REVENUE_SCHEMA,
    key=("window_start", "currency"),
    values=("total_revenue", "total_revenue_usd", "transaction_count"),
)
DAILY_REVENUE = AggregateTable(
    DAILY_REVENUE_TABLE,
    DAILY_REVENUE_SCHEMA,
    key=("revenue_date", "currency"),
    values=(
        "gross_revenue",
        "refunds",
        "chargebacks",
        "adjustments",
        "net_revenue",
        "gross_revenue_usd",
        "net_revenue_usd",
        "transaction_count",
    ),
)
CUSTOMER_METRICS = AggregateTable(
    CUSTOMER_METRICS_TABLE,
    CUSTOMER_METRICS_SCHEMA,
    key=("metric_date", "customer_id"),
    values=(
        "payments_usd",
        "refunds_usd",
        "chargebacks_usd",
        "adjustments_usd",
        "transaction_count",
    ),
)
AGGREGATE_TABLES: tuple[AggregateTable, ...] = (HOURLY_REVENUE, DAILY_REVENUE, CUSTOMER_METRICS)


# ---- pure aggregations (one definition each, shared with reconciliation) ---------------


def _total(expr: pl.Expr) -> pl.Expr:
    return expr.cast(MONEY_TOTAL).sum().cast(MONEY_TOTAL)


def _of_type(column: str, kind: str) -> pl.Expr:
    return pl.when(pl.col("transaction_type") == kind).then(pl.col(column))


def _count_of(kind: str) -> pl.Expr:
    return (pl.col("transaction_type") == kind).sum().cast(pl.Int64)


def _with_day_columns(frame: pl.DataFrame, day_column: str) -> pl.DataFrame:
    day = pl.col(day_column)
    return frame.with_columns(
        year=day.dt.year().cast(pl.Int32),
        month=day.dt.month().cast(pl.Int32),
        day=day.dt.day().cast(pl.Int32),
    )


def hourly_revenue(
    events: pl.DataFrame, *, late_payments: pl.DataFrame | None = None, now: datetime
) -> pl.DataFrame:
    """Payments per event-time hour and currency (the reference Flink SQL's tumbling window).
    `late_payments` (window_start, currency, late_event_count) are this refresh's late ones."""
    payments = events.filter(pl.col("transaction_type") == "PAYMENT")
    hours = (
        payments.group_by(window_start=pl.col("created_at").dt.truncate("1h"), currency="currency")
        .agg(
            total_revenue=_total(pl.col("amount")),
            total_revenue_usd=_total(pl.col("amount_usd")),
            transaction_count=pl.len().cast(pl.Int64),
        )
        .with_columns(window_end=pl.col("window_start") + pl.duration(hours=1))
    )
    if late_payments is None or late_payments.is_empty():
        hours = hours.with_columns(late_event_count=pl.lit(0, pl.Int64))
    else:
        hours = hours.join(late_payments, on=["window_start", "currency"], how="left").with_columns(
            pl.col("late_event_count").fill_null(0).cast(pl.Int64)
        )
    hours = hours.with_columns(updated_at=pl.lit(now, pl.Datetime("us", "UTC")))
    return (
        _with_day_columns(hours, "window_start")
        .select(list(HOURLY_REVENUE_SCHEMA))
        .cast(
            HOURLY_REVENUE_SCHEMA  # type: ignore[arg-type]
        )
    )


#: Counts per transaction type, the same in daily_revenue and customer_metrics.
_TYPE_COUNTS = {
    "payment_count": "PAYMENT",
    "refund_count": "REFUND",
    "chargeback_count": "CHARGEBACK",
    "adjustment_count": "ADJUSTMENT",
}


def _breakdown(
    events: pl.DataFrame,
    keys: dict[str, pl.Expr | str],
    sums: dict[str, pl.Expr],
    schema: dict[str, pl.DataType],
    day_column: str,
    now: datetime,
) -> pl.DataFrame:
    """Group by `keys`, sum `sums`, count per type, stamp and conform to `schema`."""
    counts = {name: _count_of(kind) for name, kind in _TYPE_COUNTS.items()}
    grouped = events.group_by(**keys).agg(
        **sums, **counts, transaction_count=pl.len().cast(pl.Int64)
    )
    grouped = grouped.with_columns(updated_at=pl.lit(now, pl.Datetime("us", "UTC")))
    return _with_day_columns(grouped, day_column).select(list(schema)).cast(schema)  # type: ignore[arg-type]


def daily_revenue(events: pl.DataFrame, *, now: datetime) -> pl.DataFrame:
    """Per event-time day and currency: gross (payments), refunds, chargebacks, adjustments
    and net, in the event currency and in USD, with counts per type."""
    return _breakdown(
        events,
        {"revenue_date": pl.col("created_at").dt.date(), "currency": "currency"},
        {
            "gross_revenue": _total(_of_type("amount", "PAYMENT")),
            "refunds": _total(_of_type("amount", "REFUND")),
            "chargebacks": _total(_of_type("amount", "CHARGEBACK")),
            "adjustments": _total(_of_type("amount", "ADJUSTMENT")),
            "net_revenue": _total(pl.col("amount")),
            "gross_revenue_usd": _total(_of_type("amount_usd", "PAYMENT")),
            "net_revenue_usd": _total(pl.col("amount_usd")),
        },
        DAILY_REVENUE_SCHEMA,
        "revenue_date",
        now,
    )


def customer_metrics(events: pl.DataFrame, *, now: datetime) -> pl.DataFrame:
    """Per customer per event-time day, in USD: payments, refunds, chargebacks,
    adjustments, net, and counts."""
    return _breakdown(
        events,
        {"metric_date": pl.col("created_at").dt.date(), "customer_id": "customer_id"},
        {
            f"{name}_usd": _total(_of_type("amount_usd", kind))
            for name, kind in (
                ("payments", "PAYMENT"),
                ("refunds", "REFUND"),
                ("chargebacks", "CHARGEBACK"),
                ("adjustments", "ADJUSTMENT"),
            )
        }
        | {"net_usd": _total(pl.col("amount_usd"))},
        CUSTOMER_METRICS_SCHEMA,
        "metric_date",
        now,
    )


def late_events(
    new_events: pl.DataFrame, newest_before: datetime | None, allowed_lateness: timedelta
) -> pl.DataFrame:
    """The `new_events` (created_at, transaction_type, currency) behind the watermark the
    table stood at; none on a first build, which has no watermark yet."""
    if newest_before is None:
        return new_events.clear()
    return new_events.filter(pl.col("created_at") < newest_before - allowed_lateness)


def late_payments_per_hour(late: pl.DataFrame) -> pl.DataFrame:
    """(window_start, currency, late_event_count) of the late payments."""
    return (
        late.filter(pl.col("transaction_type") == "PAYMENT")
        .group_by(window_start=pl.col("created_at").dt.truncate("1h"), currency="currency")
        .agg(late_event_count=pl.len().cast(pl.Int64))
    )


# ---- what changed in billing_events -----------------------------------------------------


@dataclass(frozen=True)
class SourceChange:
    """billing_events between the version the aggregates reflect and the current one."""

    from_version: int | None
    to_version: int
    days: tuple[date, ...]
    new_files: tuple[str, ...]
    #: Newest created_at in billing_events at from_version (None on a first build).
    newest_before: datetime | None


def _actions(table: DeltaTable) -> pl.DataFrame:
    return pl.DataFrame(table.get_add_actions(flatten=True))


def _days_of(actions: pl.DataFrame) -> set[date]:
    if actions.is_empty():
        return set()
    parts = [f"partition.{name}" for name in EVENT_HOUR_PARTITIONS[:3]]
    return {date(y, m, d) for y, m, d in actions.select(parts).unique().iter_rows()}


def source_change(
    lake: LakeLocation, source: DeltaTable, since_version: int | None
) -> SourceChange:
    """The days whose billing_events files were added or removed after `since_version`."""
    to_version = source.version()
    now_actions = _actions(source)
    before = None
    if since_version is not None:
        try:
            before = _actions(
                DeltaTable(
                    lake.table_uri(BILLING_EVENTS_TABLE),
                    version=since_version,
                    storage_options=lake.storage_options or None,
                )
            )
        except Exception:
            before = None
    if before is None:
        added, removed = now_actions, now_actions.clear()
        newest_before = None
        since_version = None
    else:
        added = now_actions.join(before.select("path"), on="path", how="anti")
        removed = before.join(now_actions.select("path"), on="path", how="anti")
        newest_before = before["max.created_at"].max() if before.height else None
    uri = lake.table_uri(BILLING_EVENTS_TABLE).rstrip("/")
    return SourceChange(
        from_version=since_version,
        to_version=to_version,
        days=tuple(sorted(_days_of(added) | _days_of(removed))),
        new_files=tuple(f"{uri}/{path}" for path in added["path"].to_list()),
        newest_before=newest_before,  # type: ignore[arg-type]
    )


def days_filter(days: Sequence[date]) -> pl.Expr:
    """A predicate on the year/month/day partition columns (prunes files)."""
    return partition_filter(DAY_PARTITIONS, [(d.year, d.month, d.day) for d in days])


def events_of_days(lake: LakeLocation, days: Sequence[date], version: int) -> pl.DataFrame:
    """billing_events rows of these event-time days, as of `version`."""
    return (
        pl.scan_delta(
            lake.table_uri(BILLING_EVENTS_TABLE),
            version=version,
            storage_options=lake.storage_options or None,
        )
        .filter(days_filter(days))
        .select(AGGREGATE_INPUT_COLUMNS)
        .collect()
    )


def _read_new_events(lake: LakeLocation, files: Sequence[str]) -> pl.DataFrame:
    if not files:
        return pl.DataFrame(
            schema={
                "created_at": pl.Datetime("us", "UTC"),
                "transaction_type": pl.String(),
                "currency": pl.String(),
            }
        )
    return pl.read_parquet(
        list(files),
        columns=["created_at", "transaction_type", "currency"],
        storage_options=lake.storage_options or None,
    )


# ---- writing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRefresh:
    table: str
    rows_inserted: int
    rows_updated: int
    rows_deleted: int
    table_version: int


@dataclass(frozen=True)
class AggregateRefresh:
    source_version: int | None
    days: tuple[date, ...]
    late_events: int
    late_payments: int
    tables: tuple[TableRefresh, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        return bool(self.tables)


def merge_days(
    lake: LakeLocation,
    target: AggregateTable,
    rows: pl.DataFrame,
    days: Sequence[date],
    *,
    source_version: int,
) -> TableRefresh:
    """Make `target`'s rows for `days` exactly `rows`, recording `source_version`."""
    properties = CommitProperties(app_transactions=[Transaction(SOURCE_APP_ID, source_version)])
    table = lake.open(target.name)
    if table is None:
        write_deltalake(
            lake.table_uri(target.name),
            rows.to_arrow(),
            mode="append",
            partition_by=list(DAY_PARTITIONS),
            storage_options=lake.storage_options or None,
            commit_properties=properties,
        )
        return TableRefresh(target.name, rows.height, 0, 0, 0)
    on = " AND ".join(
        [f"t.{c} = s.{c}" for c in DAY_PARTITIONS] + [f"t.{c} = s.{c}" for c in target.key]
    )
    changed = " OR ".join(f"t.{c} != s.{c}" for c in target.values)
    updates = {c: f"s.{c}" for c in target.schema if c not in target.key}
    if target is HOURLY_REVENUE:
        # Late counts accumulate: each refresh sees only the late events it absorbed.
        updates["late_event_count"] = "t.late_event_count + s.late_event_count"
        changed += " OR s.late_event_count > 0"
    merger = table.merge(
        rows.to_arrow(),
        predicate=on,
        source_alias="s",
        target_alias="t",
        commit_properties=properties,
    )
    metrics = (
        merger.when_matched_update(updates=updates, predicate=changed)
        .when_not_matched_insert_all()
        .when_not_matched_by_source_delete(
            predicate=partition_predicate(
                DAY_PARTITIONS, [(d.year, d.month, d.day) for d in days], alias="t"
            )
        )
        .execute()
    )
    return TableRefresh(
        target.name,
        int(metrics.get("num_target_rows_inserted", 0)),
        int(metrics.get("num_target_rows_updated", 0)),
        int(metrics.get("num_target_rows_deleted", 0)),
        table.version(),
    )


def reflected_version(lake: LakeLocation, target: AggregateTable) -> int | None:
    table = lake.open(target.name)
    return None if table is None else table.transaction_version(SOURCE_APP_ID)


def refresh_aggregates(
    lake: LakeLocation,
    *,
    allowed_lateness: timedelta = DEFAULT_ALLOWED_LATENESS,
    now: datetime | None = None,
) -> AggregateRefresh:
    """Bring every aggregate table up to the current billing_events version."""
    now = now or datetime.now(UTC)
    source = lake.open(BILLING_EVENTS_TABLE)
    if source is None:
        return AggregateRefresh(None, (), 0, 0)
    reflected = {t: reflected_version(lake, t) for t in AGGREGATE_TABLES}
    # hourly_revenue merges last, so its version is never ahead of the others: the files
    # added since it are exactly the ones whose late events it has not counted yet.
    since = reflected[HOURLY_REVENUE]
    if None in reflected.values():
        since = None
    elif since == source.version():
        return AggregateRefresh(since, (), 0, 0)
    change = source_change(lake, source, since)
    late = late_events(
        _read_new_events(lake, change.new_files), change.newest_before, allowed_lateness
    )
    late_payments = late_payments_per_hour(late)
    refreshed: list[TableRefresh] = []
    if change.days:
        events = events_of_days(lake, change.days, change.to_version)
        outputs = {
            DAILY_REVENUE: daily_revenue(events, now=now),
            CUSTOMER_METRICS: customer_metrics(events, now=now),
            HOURLY_REVENUE: hourly_revenue(events, late_payments=late_payments, now=now),
        }
        for target, rows in outputs.items():
            if reflected[target] == change.to_version:
                continue  # merged by a refresh that stopped before hourly_revenue
            refreshed.append(
                merge_days(lake, target, rows, change.days, source_version=change.to_version)
            )
    return AggregateRefresh(
        source_version=change.to_version,
        days=change.days,
        late_events=late.height,
        late_payments=int(late_payments["late_event_count"].sum()),
        tables=tuple(refreshed),
    )


def read_aggregate(
    lake: LakeLocation, target: AggregateTable, days: Sequence[date]
) -> pl.DataFrame:
    """An aggregate table's rows for these days (empty with its schema if none)."""
    scan = scan_table(lake, target.name)
    if scan is None:
        return pl.DataFrame(schema=target.schema)
    return scan.filter(days_filter(days)).collect()
