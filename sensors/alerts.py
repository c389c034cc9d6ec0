"""billing_alerts_sensor: the reference design's alerts, evaluated every few seconds, sent
to the notifiers when one starts firing or resolves (not on every tick)."""

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.ingest import BILLING_EVENTS
from assets.invariant_checks import INVARIANT_CHECKS
from billing_dagster.alerts import (
    Alert,
    connector_alert,
    consumer_lag_alert,
    dump_state,
    invariant_alert,
    load_state,
    notify_all,
    probe_connector,
    reconciliation_alert,
    serving_behind_alert,
    transitions,
    validation_failure_rate_alert,
)
from billing_dagster.contract import RAW_TABLE
from billing_dagster.delta_lake import committed_offsets
from billing_dagster.kafka_io import KafkaUnavailableError
from billing_dagster.offsets import consumer_lag
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.projection import decided_marks, processed_offsets, serving_gaps
from billing_dagster.reconciliation import latest_reconciliation
from billing_dagster.serving import recent_repairs, serving_marks
from resources import (
    DeltaLakeResource,
    KafkaResource,
    PostgresServingResource,
    RevenueAnalyticsResource,
)
from resources.alerting import AlertingResource

VALIDATION_WINDOW_MINUTES = 5
#: A repair from billing_events keeps "Balances Behind Lake" firing this long.
REPAIR_WINDOW_MINUTES = 15


def recent_validation_counts(instance: dg.DagsterInstance, minutes: int) -> tuple[int, int]:
    """(records read, records quarantined) by the billing_events materializations of the
    last `minutes`, from the Dagster event log."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=BILLING_EVENTS, after_timestamp=time.time() - minutes * 60),
        limit=10_000,
    ).records
    read = quarantined = 0
    for record in records:
        metadata = record.asset_materialization.metadata if record.asset_materialization else {}
        if "input_records" in metadata and "quarantined" in metadata:
            read += int(metadata["input_records"].value)
            quarantined += int(metadata["quarantined"].value)
    return read, quarantined


def evaluate_alerts(
    instance: dg.DagsterInstance,
    kafka: KafkaResource,
    lake: DeltaLakeResource,
    alerting: AlertingResource,
    analytics: RevenueAnalyticsResource,
    postgres: PostgresServingResource,
) -> list[Alert]:
    alerts = []
    topic, location = kafka.topic, lake.location()
    try:
        serving: dict[int, int] | None = serving_marks(postgres.url, topic)
        serving_error = None
    except ServingUnavailableError as exc:
        serving, serving_error = None, str(exc)
    partitions: list[int] = []
    try:
        with kafka.client() as client:
            marks = client.watermarks(topic)
        partitions = sorted(marks)
        committed = committed_offsets(location.open(RAW_TABLE), topic, partitions)
        # Processed means in the lake and in Postgres.
        processed = processed_offsets(committed, serving)
        alerts.append(consumer_lag_alert(consumer_lag(marks, processed), alerting.lag_threshold))
    except KafkaUnavailableError as exc:
        # Lag unknown is not lag zero: report it, do not silently clear a firing alert.
        alerts.append(
            replace(
                consumer_lag_alert({}, alerting.lag_threshold),
                firing=True,
                summary=f"consumer lag unknown: {exc}",
            )
        )
    alerts.append(_serving_behind(instance, postgres, location, topic, partitions, serving_error))
    alerts.append(invariant_alert(_failed_invariants(instance)))
    read, quarantined = recent_validation_counts(instance, VALIDATION_WINDOW_MINUTES)
    alerts.append(
        validation_failure_rate_alert(
            read, quarantined, alerting.validation_threshold_pct(), VALIDATION_WINDOW_MINUTES
        )
    )
    latest = latest_reconciliation(lake.location())
    alerts.append(
        reconciliation_alert(
            latest.max_discrepancy_pct if latest else None,
            analytics.tolerance_pct(),
            date=latest.day.isoformat() if latest else None,
            worst=latest.worst if latest else None,
        )
    )
    status = probe_connector(alerting.cdc_status_url) if alerting.cdc_status_url else None
    alerts.append(connector_alert(status))
    return alerts


def _serving_behind(
    instance: dg.DagsterInstance,
    postgres: PostgresServingResource,
    lake,
    topic: str,
    partitions: list[int],
    error: str | None,
) -> Alert:
    if error:
        return serving_behind_alert(
            None, [], topic=topic, window_minutes=REPAIR_WINDOW_MINUTES, error=error
        )
    since = datetime.now(UTC) - timedelta(minutes=REPAIR_WINDOW_MINUTES)
    try:
        repairs = recent_repairs(postgres.url, topic, since)
        # Between batches only: during one, Postgres trails billing_events by design.
        gaps = (
            None
            if _ingest_in_flight(instance) or not partitions
            else serving_gaps(postgres.url, topic, decided_marks(lake, topic, partitions))
        )
    except ServingUnavailableError as exc:
        return serving_behind_alert(
            None, [], topic=topic, window_minutes=REPAIR_WINDOW_MINUTES, error=str(exc)
        )
    return serving_behind_alert(gaps, repairs, topic=topic, window_minutes=REPAIR_WINDOW_MINUTES)


def _ingest_in_flight(instance: dg.DagsterInstance) -> bool:
    """A run of the ingest lane (live, replay or backfill) queued or running."""
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, INGEST_KINDS
    from sensors.kafka_offsets import WAITING_OR_RUNNING

    return any(
        run.tags.get(INGEST_CONCURRENCY_TAG) in INGEST_KINDS
        for run in instance.get_runs(dg.RunsFilter(statuses=WAITING_OR_RUNNING))
    )


def _failed_invariants(instance: dg.DagsterInstance) -> dict[str, str]:
    """The serving invariants whose latest check evaluation failed, with its summary."""
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        list(INVARIANT_CHECKS)
    )
    failed = {}
    for key, record in latest.items():
        evaluation = record.event.dagster_event.event_specific_data if record.event else None
        if evaluation is not None and getattr(evaluation, "passed", True) is False:
            failed[key.name] = evaluation.description or "failed"
    return failed


def build_alerts_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="billing_alerts_sensor",
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Consumer lag > 10,000, reconciliation mismatch > 0.1 %, CDC connector not "
            "running, validation failure rate > 0.01 % over 5 minutes. Notifies the log (and "
            "BILLING_ALERT_WEBHOOK_URL) when an alert starts or stops firing; runbooks in "
            "docs/runbooks/."
        ),
    )
    def billing_alerts_sensor(
        context: dg.SensorEvaluationContext,
        kafka: KafkaResource,
        lake: DeltaLakeResource,
        alerting: AlertingResource,
        analytics: RevenueAnalyticsResource,
        postgres: PostgresServingResource,
    ) -> dg.SkipReason:
        alerts = evaluate_alerts(context.instance, kafka, lake, alerting, analytics, postgres)
        previous = load_state(context.cursor)
        changed = transitions(previous, alerts)
        for error in notify_all(alerting.notifiers(context.log), changed):
            context.log.error(error)
        context.update_cursor(dump_state(alerts))
        firing = [a.title for a in alerts if a.firing]
        return dg.SkipReason(("firing: " + ", ".join(firing)) if firing else "all alerts quiet")

    return billing_alerts_sensor
