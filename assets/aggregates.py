"""hourly_revenue, daily_revenue and customer_metrics: refreshed in every micro-batch run,
right after the ingest step, for the event days the batch touched."""

from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg

from assets.ingest import BILLING_EVENTS, INGEST_POOL
from assets.quality_checks import QUALITY_CHECK
from billing_dagster.aggregates import (
    AGGREGATE_TABLES,
    AggregateRefresh,
    AggregateTable,
    read_aggregate,
    refresh_aggregates,
)
from billing_dagster.quality import validate_frame
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


def build_aggregate_assets() -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=AGGREGATES_OP,
        group_name="revenue",
        # In the lane: a Materialize from the UI must not MERGE beside a batch or compaction.
        pool=INGEST_POOL,
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
        refresh = refresh_aggregates(
            location, allowed_lateness=analytics.allowed_lateness(), now=datetime.now(UTC)
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
