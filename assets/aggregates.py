"""hourly_revenue, daily_revenue and customer_metrics: refreshed by the coalescing job
`refresh_revenue` (off the ingest runs), up to the billing_events version its blocking
quality check judged, for the event days changed since the previous refresh."""

from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg

from assets.ingest import BILLING_EVENTS
from assets.pools import LAKE_POOL
from assets.quality_checks import JUDGED_VERSION, QUALITY_CHECK
from billing_dagster.aggregates import (
    AGGREGATE_TABLES,
    AggregateRefresh,
    AggregateTable,
    read_aggregate,
)
from billing_dagster.quality import validate_frame
from billing_dagster.revenue_refresh import refresh_to
from resources import DeltaLakeResource, RevenueAnalyticsResource

AGGREGATES_OP = "refresh_revenue_aggregates"

#: Asset key and description per aggregate table (the suite in expectations/ has the same name).
AGGREGATE_ASSETS: dict[str, str] = {
    "hourly_revenue": (
        "Payments per event-time hour and currency (the reference design's tumbling window), "
        "in the event currency and USD, with late_event_count: payments that arrived behind "
        "the watermark and still landed in their hour. Delta: aggregated/hourly_revenue."
    ),
    "daily_revenue": (
        "Per event-time day and currency: gross revenue (payments), refunds, chargebacks, "
        "adjustments, net, in the event currency and USD, with counts. Delta: "
        "aggregated/daily_revenue/year=/month=/day=."
    ),
    "customer_metrics": (
        "Per customer per event-time day, in USD: payments, refunds, chargebacks, "
        "adjustments, net and counts. Delta: aggregated/customer_metrics/year=/month=/day=."
    ),
}

AGGREGATE_KEYS: list[dg.AssetKey] = [dg.AssetKey(name) for name in AGGREGATE_ASSETS]


def _asset_name(table: AggregateTable) -> str:
    return table.name.rsplit("/", 1)[-1]


def refresh_metadata(refresh: AggregateRefresh, table: AggregateTable) -> dict[str, object]:
    merged = next((t for t in refresh.tables if t.table == table.name), None)
    metadata: dict[str, object] = {
        "lake_table": table.name,
        "billing_events_version": refresh.source_version
        if refresh.source_version is not None
        else -1,
        "days_recomputed": ", ".join(d.isoformat() for d in refresh.days) or "none",
        "rows_inserted": merged.rows_inserted if merged else 0,
        "rows_updated": merged.rows_updated if merged else 0,
        "rows_deleted": merged.rows_deleted if merged else 0,
    }
    if table.name == "aggregated/hourly_revenue":
        metadata["late_events_absorbed"] = refresh.late_events
        metadata["late_payments_absorbed"] = refresh.late_payments
    return metadata


def judged_version(context: dg.AssetExecutionContext) -> int | None:
    """The billing_events version this run's quality check judged and passed (looked up
    through the runs it re-executes, whose check step it did not repeat); None if no
    check ran (a Materialize of the aggregates alone): then the current version."""
    run = context.run
    for _ in range(10):
        for record in context.instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ).records:
            evaluation = record.event_log_entry.dagster_event.event_specific_data
            if evaluation.asset_key == BILLING_EVENTS and evaluation.check_name == QUALITY_CHECK:
                judged = evaluation.metadata.get(JUDGED_VERSION)
                return None if judged is None or judged.value < 0 else int(judged.value)
        parent = run.parent_run_id and context.instance.get_run_by_id(run.parent_run_id)
        if not parent:
            return None
        run = parent
    return None


def build_aggregate_assets() -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=AGGREGATES_OP,
        group_name="revenue",
        # One lake writer of the aggregates at a time, however launched: the refresh,
        # reconciliation and compaction all merge or acknowledge into them.
        pool=LAKE_POOL,
        specs=[
            dg.AssetSpec(
                _asset_name(t),
                deps=[BILLING_EVENTS],
                description=AGGREGATE_ASSETS[_asset_name(t)],
                kinds={"polars", "delta"},
                metadata={"lake_table": t.name},
            )
            for t in AGGREGATE_TABLES
        ],
        check_specs=[
            dg.AssetCheckSpec(
                QUALITY_CHECK,
                asset=_asset_name(t),
                description=f"Great Expectations suite expectations/{_asset_name(t)}.json "
                "over the days this refresh recomputed.",
            )
            for t in AGGREGATE_TABLES
        ],
        retry_policy=dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL),
    )
    def refresh_revenue_aggregates(
        context: dg.AssetExecutionContext,
        lake: DeltaLakeResource,
        analytics: RevenueAnalyticsResource,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        location = lake.location()
        # Exactly what the blocking check judged, not what lanes committed since.
        version = judged_version(context)
        refresh = refresh_to(
            location, version, allowed_lateness=analytics.allowed_lateness(), now=datetime.now(UTC)
        )
        if refresh.late_events:
            context.log.info(
                f"absorbed {refresh.late_events} late events "
                f"({refresh.late_payments} payments) into their hours"
            )
        for table in AGGREGATE_TABLES:
            name = _asset_name(table)
            yield dg.MaterializeResult(asset_key=name, metadata=refresh_metadata(refresh, table))
            report = validate_frame(read_aggregate(location, table, refresh.days), name)
            yield dg.AssetCheckResult(
                asset_key=name,
                check_name=QUALITY_CHECK,
                passed=report.success,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata=report.to_metadata(),
            )

    return refresh_revenue_aggregates
