"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG

from assets.aggregates import build_aggregate_assets
from assets.ingest import INGEST_JOB, INGEST_OP, build_ingest_assets
from assets.invariant_checks import build_invariant_checks
from assets.maintenance import compact_event_hours, vacuum_lake_tables
from assets.partitions import day_partitions, log_hour_partitions, month_partitions
from assets.quality_checks import build_quality_checks
from assets.reconciliation import build_oltp_reconciliation_asset, build_reconciliation_assets
from billing_dagster.revenue_refresh import REFRESH_JOB, REFRESH_KIND
from billing_dagster.settings import Settings, load_settings
from resources import (
    BillingRulesResource,
    DeltaLakeResource,
    KafkaResource,
    OltpSourceResource,
    PostgresServingResource,
    RevenueAnalyticsResource,
)
from resources.alerting import AlertingResource
from sensors.alerts import build_alerts_sensor
from sensors.kafka_offsets import build_kafka_offsets_sensor
from sensors.revenue_refresh import build_revenue_refresh_sensor

#: The kind of a pipeline run (a label: the run queue limits runs per lane, by the tag
#: billing_dagster/lanes.py LANE_TAG, and the pools of assets/pools.py hold the rest).
INGEST_CONCURRENCY_TAG = "billing/ingest"
#: Its values on runs that ingest (the live sensor's, replays and backfills); the other
#: runs are "reconcile", "invariants" and "maintenance"; the revenue refresh's runs are
#: "revenue" (billing_dagster/revenue_refresh.py REFRESH_KIND).
INGEST_KINDS = ("kafka", "replay")


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    optional: dict[str, dg.ConfigurableResource] = {}
    if settings.oltp_url:
        optional["oltp"] = OltpSourceResource(url=settings.oltp_url)
    return {
        **optional,
        "kafka": KafkaResource(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            topic=settings.topic,
            consumer_group=settings.consumer_group,
            request_timeout_seconds=settings.kafka_request_timeout_s,
            topic_formats=settings.topic_formats,
        ),
        "lake": DeltaLakeResource(
            root=settings.lake_root,
            s3_endpoint_url=settings.s3_endpoint_url,
            aws_region=settings.aws_region,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
            s3_allow_http=settings.s3_allow_http,
        ),
        "postgres": PostgresServingResource(url=settings.postgres_url),
        "analytics": RevenueAnalyticsResource(
            late_event_watermark_seconds=settings.late_event_watermark_s,
            reconciliation_tolerance_percent=str(settings.reconciliation_tolerance_pct),
        ),
        "alerting": AlertingResource(
            webhook_url=settings.alert_webhook_url,
            runbook_base_url=settings.runbook_base_url,
            cdc_status_url=settings.cdc_status_url,
            lag_threshold=settings.lag_alert_threshold,
            stall_alert_minutes=settings.stall_alert_minutes,
            validation_failure_percent=str(settings.validation_alert_pct),
        ),
        "billing_rules": BillingRulesResource(
            supported_currencies=list(settings.supported_currencies),
            max_future_skew_seconds=settings.max_future_skew_s,
            schema_registry_url=settings.schema_registry_url,
            dedupe_horizon_days=settings.dedupe_horizon_days,
            circuit_breaker_percent=str(settings.circuit_breaker_pct),
            circuit_breaker_min_records=settings.circuit_breaker_min_records,
            max_event_id_length=settings.max_event_id_length,
            max_metadata_bytes=settings.max_metadata_bytes,
            max_record_bytes=settings.max_record_bytes,
        ),
    }


def build_definitions(settings: Settings) -> dg.Definitions:
    partitions = log_hour_partitions(settings.partitions_start)
    ingest_assets = build_ingest_assets(partitions)
    # Run monitoring (dev/dagster.yaml) fails a lane run stranded longer than this (its
    # worker died with the code server, which DefaultRunLauncher cannot health-check).
    max_runtime = {MAX_RUNTIME_SECONDS_TAG: str(settings.lane_max_runtime_s)}
    aggregate_assets = build_aggregate_assets()
    daily_reconciliation, monthly_report = build_reconciliation_assets(
        day_partitions(settings.partitions_start), month_partitions(settings.partitions_start)
    )
    checks = build_quality_checks()
    invariant_checks = build_invariant_checks()
    # Reconciliation against the OLTP source exists only where CDC from it is configured.
    oltp_assets = (
        [build_oltp_reconciliation_asset(day_partitions(settings.partitions_start))]
        if settings.oltp_url
        else []
    )
    ingest_job = dg.define_asset_job(
        INGEST_JOB,
        # The money only: what gates it (contract, rules, circuit breaker) runs inside the
        # step before the Postgres commit; nothing after the commit is on the latency path.
        # The quality checks and the aggregates follow in refresh_revenue, which coalesces
        # however many batches (of however many lanes) landed meanwhile.
        selection=dg.AssetSelection.assets(ingest_assets).without_checks(),
        tags={INGEST_CONCURRENCY_TAG: "kafka", **max_runtime},
        # In process: separate step processes would only add ~2 s of start-up each.
        executor_def=dg.in_process_executor,
        description=(
            "One micro-batch: Kafka offsets to raw/, billing_events/ and quarantine/ and the "
            "Postgres balances, exactly once."
        ),
    )
    refresh_job = dg.define_asset_job(
        REFRESH_JOB,
        # The blocking billing_events check judges the rows added since the previous
        # refresh, then the aggregates merge exactly those (the version it judged).
        selection=dg.AssetSelection.assets(aggregate_assets) | dg.AssetSelection.checks(*checks),
        # Not an ingest lane's run: no billing/lane tag, the pool billing_lake serializes it
        # with reconciliation and compaction; the sensor keeps one in flight at most.
        tags={INGEST_CONCURRENCY_TAG: REFRESH_KIND, **max_runtime},
        executor_def=dg.in_process_executor,
        description=(
            "The revenue aggregates up to billing_events, after its Great Expectations check "
            "over every row added since the previous refresh; and the customer_balances check."
        ),
    )
    reconcile_job = dg.define_asset_job(
        "reconcile_daily_revenue",
        selection=[daily_reconciliation, *oltp_assets],
        # Queued behind ingest runs (same limit): never compares a half-applied batch.
        tags={INGEST_CONCURRENCY_TAG: "reconcile", **max_runtime},
        executor_def=dg.in_process_executor,
        description=(
            "Reconcile one day's real-time revenue against the raw lake (and, with "
            "BILLING_OLTP_URL, against the OLTP database)."
        ),
    )
    invariants_job = dg.define_asset_job(
        "check_serving_invariants",
        selection=dg.AssetSelection.checks(invariant_checks),
        # In the ingest lane: the marks are compared between batches, never during one.
        tags={INGEST_CONCURRENCY_TAG: "invariants", **max_runtime},
        executor_def=dg.in_process_executor,
        description=(
            "Postgres against the lake: balances = history per customer, history = "
            "billing_events per day, serving marks = lake marks."
        ),
    )
    monthly_job = dg.define_asset_job(
        "monthly_reconciliation",
        selection=[monthly_report],
        executor_def=dg.in_process_executor,
        description="The month-end reconciliation report.",
    )
    maintenance_tags = {INGEST_CONCURRENCY_TAG: "maintenance", **max_runtime}

    # Queued like ingest runs: compaction acknowledges its commit in the aggregates only
    # if no batch landed meanwhile.
    @dg.job(tags=maintenance_tags, executor_def=dg.in_process_executor)
    def compact_lake():
        """Rewrite the small files of the last finished event hours of raw/ and
        billing_events/ as large ones (hourly)."""
        compact_event_hours()

    @dg.job(tags=maintenance_tags, executor_def=dg.in_process_executor)
    def vacuum_lake():
        """Delete lake files no version of the last 7 days refers to (daily)."""
        vacuum_lake_tables()

    sensor = build_kafka_offsets_sensor(
        ingest_job,
        op_name=INGEST_OP,
        interval_s=settings.sensor_interval_s,
        max_records_per_run=settings.max_records_per_run,
        start_from=settings.start_from,
        lanes=settings.ingest_lanes,
    )
    return dg.Definitions(
        assets=[
            ingest_assets,
            aggregate_assets,
            daily_reconciliation,
            monthly_report,
            *oltp_assets,
        ],
        asset_checks=[*checks, invariant_checks],
        jobs=[
            ingest_job,
            refresh_job,
            reconcile_job,
            invariants_job,
            monthly_job,
            compact_lake,
            vacuum_lake,
        ],
        schedules=[
            dg.ScheduleDefinition(
                name="compact_lake_schedule",
                job=compact_lake,
                cron_schedule="10 * * * *",
                execution_timezone="UTC",
                default_status=dg.DefaultScheduleStatus.RUNNING,
            ),
            dg.ScheduleDefinition(
                name="check_serving_invariants_schedule",
                job=invariants_job,
                cron_schedule="*/15 * * * *",
                execution_timezone="UTC",
                default_status=dg.DefaultScheduleStatus.RUNNING,
            ),
            dg.ScheduleDefinition(
                name="vacuum_lake_schedule",
                job=vacuum_lake,
                cron_schedule="40 3 * * *",
                execution_timezone="UTC",
                default_status=dg.DefaultScheduleStatus.RUNNING,
            ),
            # 00:30 UTC: yesterday's partition, once late events have had half an hour.
            dg.build_schedule_from_partitioned_job(
                reconcile_job,
                name="daily_reconciliation_schedule",
                hour_of_day=0,
                minute_of_hour=30,
                default_status=dg.DefaultScheduleStatus.RUNNING,
            ),
            dg.build_schedule_from_partitioned_job(
                monthly_job,
                name="monthly_reconciliation_schedule",
                day_of_month=1,
                hour_of_day=2,
                minute_of_hour=0,
                default_status=dg.DefaultScheduleStatus.RUNNING,
            ),
        ],
        sensors=[
            sensor,
            build_revenue_refresh_sensor(refresh_job, settings.revenue_refresh_interval_s),
            build_alerts_sensor(settings.alerts_interval_s),
        ],
        resources=build_resources(settings),
        # For the jobs Dagster makes itself (a UI Materialize or backfill: __ASSET_JOB):
        # in process like every job above, so they run on a Celery worker too, whose pool
        # processes may not start step processes of their own (docs/scaling.md).
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_settings())
