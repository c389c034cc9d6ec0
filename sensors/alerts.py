"""billing_alerts_sensor: the reference design's alerts, evaluated every few seconds, sent
to the notifiers when one starts firing or resolves (not on every tick)."""

import time
from dataclasses import replace

import dagster as dg

from assets.ingest import BILLING_EVENTS
from billing_dagster.alerts import (
    Alert,
    connector_alert,
    consumer_lag_alert,
    dump_state,
    load_state,
    notify_all,
    probe_connector,
    reconciliation_alert,
    transitions,
    validation_failure_rate_alert,
)
from billing_dagster.contract import RAW_TABLE
from billing_dagster.delta_lake import committed_offsets
from billing_dagster.kafka_io import KafkaUnavailableError
from billing_dagster.offsets import consumer_lag
from billing_dagster.reconciliation import latest_reconciliation
from resources import DeltaLakeResource, KafkaResource, RevenueAnalyticsResource
from resources.alerting import AlertingResource

VALIDATION_WINDOW_MINUTES = 5


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
) -> list[Alert]:
    alerts = []
    try:
        with kafka.client() as client:
            marks = client.watermarks(kafka.topic)
        committed = committed_offsets(lake.location().open(RAW_TABLE), kafka.topic, list(marks))
        alerts.append(consumer_lag_alert(consumer_lag(marks, committed), alerting.lag_threshold))
    except KafkaUnavailableError as exc:
        # Lag unknown is not lag zero: report it, do not silently clear a firing alert.
        alerts.append(
            replace(
                consumer_lag_alert({}, alerting.lag_threshold),
                firing=True,
                summary=f"consumer lag unknown: {exc}",
            )
        )
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
    ) -> dg.SkipReason:
        alerts = evaluate_alerts(context.instance, kafka, lake, alerting, analytics)
        previous = load_state(context.cursor)
        changed = transitions(previous, alerts)
        for error in notify_all(alerting.notifiers(context.log), changed):
            context.log.error(error)
        context.update_cursor(dump_state(alerts))
        firing = [a.title for a in alerts if a.firing]
        return dg.SkipReason(("firing: " + ", ".join(firing)) if firing else "all alerts quiet")

    return billing_alerts_sensor
