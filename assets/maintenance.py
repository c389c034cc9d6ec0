"""Lake maintenance on a schedule: compact the small files micro-batches leave in each
finished event hour, and vacuum files no recent version needs."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.pools import LAKE_POOL
from billing_dagster.compaction import acknowledge_compaction, compact_hours, vacuum_table
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.lake_barrier import LakeBusyError, lake_at_rest
from billing_dagster.offsets import hour_start
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.revenue_refresh import checked_refresh
from resources import (
    BillingRulesResource,
    DeltaLakeResource,
    PostgresServingResource,
    RevenueAnalyticsResource,
)

COMPACTED_TABLES = (RAW_TABLE, BILLING_EVENTS_TABLE)


class CompactionConfig(dg.Config):
    """Which event hours to compact: the `hours` full hours before the current one."""

    hours: int = 2


class VacuumConfig(dg.Config):
    #: Files unreferenced for longer than this are deleted; readers of older versions
    #: (time travel, a long reconciliation) need them until then. Delta's default: 7 days.
    retention_hours: int = 168


# Compaction holds the lake barrier from its refresh to its acknowledgment: lanes append
# in parallel, and a batch committed in between would make the acknowledgment wrong (its
# rows must still reach the aggregates) or, landing in a compacted hour, conflict.
@dg.op(
    description="Compact the last finished event hours of raw/ and billing_events/.",
    pool=LAKE_POOL,
    retry_policy=dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL),
)
def compact_event_hours(
    context: dg.OpExecutionContext,
    config: CompactionConfig,
    lake: DeltaLakeResource,
    analytics: RevenueAnalyticsResource,
    postgres: PostgresServingResource,
    billing_rules: BillingRulesResource,
) -> None:
    location = lake.location()
    now = hour_start(datetime.now(UTC))
    hours = [now - timedelta(hours=back) for back in range(config.hours, 0, -1)]
    try:
        with lake_at_rest(postgres.url):
            # The aggregates reflect billing_events first (no batch commits meanwhile), so
            # the compacted version can be acknowledged as changing nothing.
            checked = checked_refresh(
                location,
                supported_currencies=billing_rules.supported_currencies,
                allowed_lateness=analytics.allowed_lateness(),
            )
            for name in COMPACTED_TABLES:
                if name == BILLING_EVENTS_TABLE and checked.refresh is None:
                    # Unacknowledged, the rewrite would count old events as late once the
                    # held rows are fixed: billing_events waits for a later compaction.
                    context.log.warning(f"{name} not compacted: {checked.held()}")
                    continue
                result = compact_hours(location, name, hours)
                acknowledged = acknowledge_compaction(location, result)
                context.log.info(
                    f"{name}: {result.files_removed} files -> {result.files_added} in "
                    f"{result.partitions} hours"
                    + (f"; acknowledged by {', '.join(acknowledged)}" if acknowledged else "")
                )
    except (LakeBusyError, ServingUnavailableError) as exc:
        raise dg.Failure(str(exc)) from exc


# Vacuum takes no barrier: it deletes only files no version of the retention window
# refers to, which no batch (appending new files) or reader of a recent version touches.
@dg.op(description="Vacuum raw/, billing_events/ and quarantine/.", pool=LAKE_POOL)
def vacuum_lake_tables(
    context: dg.OpExecutionContext, config: VacuumConfig, lake: DeltaLakeResource
) -> None:
    location = lake.location()
    for name in (*COMPACTED_TABLES, QUARANTINE_TABLE):
        deleted = vacuum_table(location, name, config.retention_hours)
        context.log.info(f"{name}: deleted {deleted} unreferenced files")
