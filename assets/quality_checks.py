"""Great Expectations suites (expectations/*.json) as Dagster asset checks on the ingest
outputs. The aggregate tables' suites run inside their refresh step."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.ingest import BILLING_EVENTS, CUSTOMER_BALANCES
from billing_dagster.batch_check import checked_batch_rows
from billing_dagster.offsets import ranges_from_text
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.quality import validate_frame
from billing_dagster.serving import read_balances
from resources import BillingRulesResource, DeltaLakeResource, PostgresServingResource

QUALITY_CHECK = "great_expectations"
#: Rows this run wrote must have been ingested within this long of the check.
FRESHNESS = timedelta(minutes=15)


def batch_metadata(context: dg.AssetCheckExecutionContext) -> dict[str, object]:
    """The billing_events materialization of this run (the batch the check judges)."""
    for record in context.instance.all_logs(
        context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ):
        materialization = record.asset_materialization
        if materialization is not None and materialization.asset_key == BILLING_EVENTS:
            return {k: v.value for k, v in materialization.metadata.items()}
    return {}


def build_quality_checks() -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(
        asset=BILLING_EVENTS,
        name=QUALITY_CHECK,
        blocking=True,
        description=(
            "expectations/billing_events.json over the rows this run's batch wrote, with "
            "every row of the same event hours sharing their event_id: non-null keys, "
            "enums, supported currencies, decimal(12,2) ranges, unique event_id and Kafka "
            "position, freshness of what the run wrote. Blocking: a failure stops the "
            "revenue aggregates of this run."
        ),
    )
    def billing_events_quality(
        context: dg.AssetCheckExecutionContext,
        lake: DeltaLakeResource,
        billing_rules: BillingRulesResource,
    ) -> dg.AssetCheckResult:
        batch = batch_metadata(context)
        hours = [h for h in str(batch.get("event_hours", "")).split(", ") if h]
        frame = checked_batch_rows(
            lake.location(),
            str(batch.get("topic", "")),
            hours,
            ranges_from_text(str(batch.get("offset_ranges_read", ""))),
        )
        parameters: dict[str, object] = {
            "supported_currencies": list(billing_rules.supported_currencies)
        }
        if int(batch.get("accepted_written", 0) or 0) > 0:
            parameters["freshness_floor"] = datetime.now(UTC) - FRESHNESS
        report = validate_frame(frame, "billing_events", parameters=parameters)
        return dg.AssetCheckResult(
            passed=report.success,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={**report.to_metadata(), "event_hours": ", ".join(hours)},
        )

    @dg.asset_check(
        asset=CUSTOMER_BALANCES,
        name=QUALITY_CHECK,
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
