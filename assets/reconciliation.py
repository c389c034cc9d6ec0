"""daily_reconciliation (scheduled for the previous day) and the month-end report.

Ingest lanes commit in parallel, so the daily reconciliation reads what it compares (the
aggregates against raw/) while holding the lake barrier (billing_dagster/lake_barrier.py),
after bringing the aggregates up to the lake in the same hold: it compares neither half a
batch nor revenue that lags the lake.
"""

from collections.abc import Iterator
from datetime import UTC, date, datetime

import dagster as dg

from assets.ingest import RAW_BILLING_EVENTS
from assets.pools import LAKE_POOL
from billing_dagster.contract import (
    DISCREPANCIES_TABLE,
    MONTHLY_REPORT_TABLE,
    OLTP_RECONCILIATION_TABLE,
    RECONCILIATION_TABLE,
)
from billing_dagster.enrichment import ReferenceDataError, load_reference_data
from billing_dagster.lake_barrier import LakeBusyError, lake_at_rest
from billing_dagster.monthly_report import monthly_report, write_monthly_report
from billing_dagster.oltp_reconciliation import reconcile_oltp_day, write_oltp_reconciliation
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.reconciliation import reconcile_day, write_reconciliation
from billing_dagster.revenue_refresh import checked_refresh
from resources import (
    BillingRulesResource,
    DeltaLakeResource,
    OltpSourceResource,
    PostgresServingResource,
    RevenueAnalyticsResource,
)

DAILY_RECONCILIATION = dg.AssetKey("daily_reconciliation")
MONTHLY_REPORT = dg.AssetKey("monthly_reconciliation_report")
OLTP_RECONCILIATION = dg.AssetKey("oltp_reconciliation")
WITHIN_TOLERANCE = "within_tolerance"
MATCHES_OLTP = "matches_oltp"
#: A barrier not granted (a batch stuck mid-commit) or Postgres away: retried later.
BARRIER_RETRY = dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL)


def _reference(lake: DeltaLakeResource):
    try:
        return load_reference_data(lake.location())
    except ReferenceDataError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


def build_reconciliation_assets(
    daily: dg.DailyPartitionsDefinition, monthly: dg.MonthlyPartitionsDefinition
) -> list[dg.AssetsDefinition]:
    @dg.asset(
        key=DAILY_RECONCILIATION,
        partitions_def=daily,
        group_name="reconciliation",
        # One lake reader-rewriter at a time; the barrier keeps batches out while it reads.
        pool=LAKE_POOL,
        retry_policy=BARRIER_RETRY,
        deps=["daily_revenue", "customer_metrics", RAW_BILLING_EVENTS],
        kinds={"polars", "delta"},
        description=(
            "Real-time revenue (daily_revenue per currency, customer_metrics per customer) "
            "against a batch recomputation of the day from raw/ (deliveries less quarantine, "
            "once per event_id). Results in reconciliation/daily; every differing currency "
            "or customer, with the events behind it, in reconciliation/discrepancies."
        ),
        metadata={"lake_table": RECONCILIATION_TABLE, "discrepancies_table": DISCREPANCIES_TABLE},
        check_specs=[
            dg.AssetCheckSpec(
                WITHIN_TOLERANCE,
                asset=DAILY_RECONCILIATION,
                description="Every currency and customer within the reconciliation tolerance.",
            )
        ],
    )
    def daily_reconciliation(
        context: dg.AssetExecutionContext,
        lake: DeltaLakeResource,
        analytics: RevenueAnalyticsResource,
        postgres: PostgresServingResource,
        billing_rules: BillingRulesResource,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        day = date.fromisoformat(context.partition_key)
        location = lake.location()
        reference = _reference(lake)
        try:
            with lake_at_rest(postgres.url):
                # The aggregates first, through the same blocking check as the refresh job.
                checked = checked_refresh(
                    location,
                    supported_currencies=billing_rules.supported_currencies,
                    allowed_lateness=analytics.allowed_lateness(),
                )
                if checked.refresh is None:
                    # Reconciling aggregates held back would report their lag as a mismatch.
                    raise dg.Failure(checked.held(), allow_retries=False)
                result = reconcile_day(
                    location,
                    day,
                    reference,
                    tolerance_pct=analytics.tolerance_pct(),
                    run_id=context.run.run_id,
                    now=datetime.now(UTC),
                )
        except (LakeBusyError, ServingUnavailableError) as exc:
            raise dg.Failure(str(exc)) from exc
        write_reconciliation(location, result)
        metadata = result.metadata()
        if not result.within_tolerance:
            context.log.error(
                f"{day}: reconciliation mismatch, worst {metadata['max_discrepancy_pct']}% "
                f"(tolerance {result.tolerance_pct}%); see {DISCREPANCIES_TABLE}"
            )
        yield dg.MaterializeResult(
            metadata={
                **{
                    k: dg.MetadataValue.json(v) if isinstance(v, dict | list) else v
                    for k, v in metadata.items()
                },
                "dagster/row_count": result.summary.height,
            }
        )
        yield dg.AssetCheckResult(
            check_name=WITHIN_TOLERANCE,
            passed=result.within_tolerance,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "max_discrepancy_pct": metadata["max_discrepancy_pct"],
                "tolerance_pct": metadata["tolerance_pct"],
                "customers_beyond_tolerance": result.customers_beyond_tolerance,
                "differing_events": dg.MetadataValue.json(metadata["differing_events"]),
            },
        )

    @dg.asset(
        key=MONTHLY_REPORT,
        partitions_def=monthly,
        group_name="reconciliation",
        deps=[DAILY_RECONCILIATION],
        kinds={"polars", "delta"},
        description=(
            "Month-end reconciliation: totals per currency (real-time against batch), days "
            "reconciled and beyond tolerance, discrepancy rows, quarantined events by rule. "
            "Delta: reconciliation/monthly; also `billing-dagster report --month`."
        ),
        metadata={"lake_table": MONTHLY_REPORT_TABLE},
    )
    def monthly_reconciliation_report(
        context: dg.AssetExecutionContext,
        lake: DeltaLakeResource,
        analytics: RevenueAnalyticsResource,
    ) -> dg.MaterializeResult:
        month = date.fromisoformat(context.partition_key)
        report = monthly_report(
            lake.location(), month, _reference(lake), tolerance_pct=analytics.tolerance_pct()
        )
        write_monthly_report(lake.location(), report)
        context.log.info("\n" + report.to_text())
        return dg.MaterializeResult(
            metadata={
                "status": "reconciled" if report.within_tolerance else "mismatch",
                "report": dg.MetadataValue.md("```\n" + report.to_text() + "\n```"),
                "days_beyond_tolerance": len(report.days_beyond_tolerance),
                "days_not_reconciled": len(report.days_not_reconciled),
                "quarantined": report.quarantined,
            }
        )

    return [daily_reconciliation, monthly_reconciliation_report]


def _json_safe(metadata: dict[str, object]) -> dict[str, object]:
    return {
        k: dg.MetadataValue.json(v) if isinstance(v, dict | list) else v
        for k, v in metadata.items()
    }


def build_oltp_reconciliation_asset(daily: dg.DailyPartitionsDefinition) -> dg.AssetsDefinition:
    """Only defined when BILLING_OLTP_URL names the OLTP database Debezium captures."""

    @dg.asset(
        key=OLTP_RECONCILIATION,
        partitions_def=daily,
        group_name="reconciliation",
        pool=LAKE_POOL,
        deps=["billing_events"],
        kinds={"postgres", "delta"},
        description=(
            "The day's money rows in the OLTP billing database (transactions, payments, "
            "refunds) against billing_events: per currency and per event. Results in "
            "reconciliation/oltp."
        ),
        metadata={"lake_table": OLTP_RECONCILIATION_TABLE},
        check_specs=[
            dg.AssetCheckSpec(
                MATCHES_OLTP,
                asset=OLTP_RECONCILIATION,
                description="Every OLTP money row of the day is in billing_events, once, "
                "with the same amount, and nothing else is.",
            )
        ],
    )
    def oltp_reconciliation(
        context: dg.AssetExecutionContext,
        lake: DeltaLakeResource,
        oltp: OltpSourceResource,
        analytics: RevenueAnalyticsResource,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        day = date.fromisoformat(context.partition_key)
        # No barrier: it compares one billing_events snapshot with the OLTP source, and a
        # snapshot is never half a batch (Postgres, which a batch commits in between, is
        # not read here); lanes go on meanwhile.
        try:
            result = reconcile_oltp_day(
                lake.location(), oltp.url, day, tolerance_pct=analytics.tolerance_pct()
            )
        except ServingUnavailableError as exc:
            raise dg.Failure(str(exc)) from exc
        write_oltp_reconciliation(lake.location(), result)
        metadata = result.metadata()
        if result.status != "reconciled":
            context.log.error(
                f"{day}: {result.differences.height} events differ between the OLTP database "
                f"and billing_events ({metadata['by_kind']})"
            )
        yield dg.MaterializeResult(
            metadata={**_json_safe(metadata), "dagster/row_count": result.summary.height}
        )
        yield dg.AssetCheckResult(
            check_name=MATCHES_OLTP,
            passed=result.status in ("reconciled", "no_data"),
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "differing_events": result.differences.height,
                "max_discrepancy_pct": metadata["max_discrepancy_pct"],
            },
        )

    return oltp_reconciliation
