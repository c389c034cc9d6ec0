"""Great Expectations suites (expectations/*.json) as Dagster asset checks on billing_events
and customer_balances, run by the revenue refresh (job `refresh_revenue`), off the ingest
runs' latency path. The aggregate tables' suites run inside their refresh step."""

import dagster as dg

from assets.ingest import BILLING_EVENTS, CUSTOMER_BALANCES
from assets.pools import LAKE_POOL
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.quality import validate_frame
from billing_dagster.revenue_refresh import judge_new_rows
from billing_dagster.serving import read_balances
from resources import BillingRulesResource, DeltaLakeResource, PostgresServingResource

QUALITY_CHECK = "great_expectations"
#: Metadata of the billing_events check: the version it judged, which its run's
#: aggregates step merges up to (assets/aggregates.py).
JUDGED_VERSION = "billing_events_version"


def build_quality_checks() -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(
        asset=BILLING_EVENTS,
        name=QUALITY_CHECK,
        blocking=True,
        # With the aggregates: it judges what they are about to merge.
        pool=LAKE_POOL,
        description=(
            "expectations/billing_events.json over the rows added since the version the "
            "revenue aggregates reflect (every batch since the previous refresh), with every "
            "row of their event hours sharing an event_id or a Kafka position: non-null "
            "keys, enums, supported currencies, decimal(12,2) ranges, unique event_id and "
            "Kafka position, freshness of the newest rows against their commit. Blocking: "
            "a failure stops the revenue aggregates, which then merge nothing."
        ),
    )
    def billing_events_quality(
        lake: DeltaLakeResource, billing_rules: BillingRulesResource
    ) -> dg.AssetCheckResult:
        judgement = judge_new_rows(lake.location())
        report = validate_frame(
            judgement.rows,
            "billing_events",
            parameters=judgement.parameters(billing_rules.supported_currencies),
        )
        return dg.AssetCheckResult(
            passed=report.success,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                **report.to_metadata(),
                JUDGED_VERSION: -1 if judgement.version is None else judgement.version,
                "since_version": -1 if judgement.since is None else judgement.since,
                "event_hours": ", ".join(judgement.hours()),
            },
        )

    @dg.asset_check(
        asset=CUSTOMER_BALANCES,
        name=QUALITY_CHECK,
        pool=LAKE_POOL,
        description=(
            "expectations/customer_balances.json over the whole table: one row per "
            "customer, USD, within decimal(12,2), version >= 1."
        ),
    )
    def customer_balances_quality(
        postgres: PostgresServingResource,
    ) -> dg.AssetCheckResult:
        try:
            frame = read_balances(postgres.url)
        except ServingUnavailableError as exc:
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"error": str(exc)},
            )
        report = validate_frame(frame, "customer_balances")
        return dg.AssetCheckResult(
            passed=report.success,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata=report.to_metadata(),
        )

    return [billing_events_quality, customer_balances_quality]
