"""billing_alerts_sensor: the reference design's alerts, evaluated every few seconds, sent
to the notifiers when one starts firing or resolves (not on every tick)."""

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.ingest import BILLING_EVENTS
from assets.invariant_checks import INVARIANT_CHECKS
from billing_dagster.alert_state import (
    LakeProgress,
    SensorState,
    deliver,
    dump_sensor_state,
    load_sensor_state,
    track_progress,
)
from billing_dagster.alerts import (
    Alert,
    circuit_breaker_alert,
    connector_alert,
    consumer_lag_alert,
    ingest_run_failed_alert,
    ingest_stalled_alert,
    invariant_alert,
    offsets_lost_alert,
    reconciliation_alert,
    serving_behind_alert,
    validation_failure_rate_alert,
)
from billing_dagster.circuit_breaker import (
    BREAKER_RULE_TAG,
    BREAKER_TAG,
    HELD,
    IngestRunOutcome,
    open_holds,
)
from billing_dagster.connector_probe import probe_connector
from billing_dagster.contract import RAW_TABLE
from billing_dagster.delta_lake import LakeLocation, committed_offsets
from billing_dagster.kafka_io import KafkaUnavailableError
from billing_dagster.lost_offsets import acknowledged_gaps, lost_offsets
from billing_dagster.offsets import consumer_lag
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.projection import decided_marks, processed_offsets, serving_gaps
from billing_dagster.reconciliation import latest_reconciliation
from billing_dagster.serving import recent_repairs, serving_marks
from billing_dagster.topic_identity import (
    TopicRecreatedError,
    current_generation,
    resolve_generation,
)
from resources import (
    DeltaLakeResource,
    KafkaResource,
    PostgresServingResource,
    RevenueAnalyticsResource,
)
from resources.alerting import AlertingResource
from sensors.lane import finished_lane_runs, ingest_runs_in_flight
from sensors.revenue_refresh import evaluate_refresh_alert

VALIDATION_WINDOW_MINUTES = 5
#: A repair from billing_events keeps "Balances Behind Lake" firing this long.
REPAIR_WINDOW_MINUTES = 15
#: "Ingest Run Failed" looks at the lane's runs that ended this long ago at most.
RUN_FAILED_WINDOW_MINUTES = 60


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
    location = lake.location()
    # The key the marks of the configured topic are kept under (topic_identity.py).
    generation = current_generation(location, kafka.topic)
    topic = generation.key if generation else kafka.topic
    try:
        serving: dict[int, int] | None = serving_marks(postgres.url, topic)
        serving_error = None
    except ServingUnavailableError as exc:
        serving, serving_error = None, str(exc)
    partitions: list[int] = []
    try:
        with kafka.client() as client:
            marks = client.watermarks(topic)
            topic_id = client.topic_id(topic)
        partitions = sorted(marks)
        committed = committed_offsets(location.open(RAW_TABLE), topic, partitions)
        # Processed means in the lake and in Postgres.
        processed = processed_offsets(committed, serving)
        lost = lost_offsets(committed, {p: low for p, (low, _) in marks.items()})
        lag = consumer_lag_alert(
            consumer_lag(marks, processed),
            alerting.lag_threshold,
            lost=lost,
            acknowledged_gaps=sum(g.size for g in acknowledged_gaps(location, topic)),
        )
        alerts.append(_unless_recreated(lag, location, kafka.topic, topic_id))
        alerts.append(offsets_lost_alert(lost, topic=topic))
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
    alerts.append(circuit_breaker_alert(held_batches(instance)))
    return alerts


def _unless_recreated(
    lag: Alert, location: LakeLocation, topic: str, topic_id: str | None
) -> Alert:
    """A recreated topic not yet adopted: nothing is processed, whatever the lag says."""
    try:
        resolve_generation(location, topic, topic_id, record=False)
    except TopicRecreatedError as exc:
        return replace(lag, firing=True, summary=f"consumer lag unknown: {exc}")
    return lag


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
    """A run that ingests queued or running: live, replay, backfill, or launched from the
    UI (sensors/lane.py)."""
    return bool(ingest_runs_in_flight(instance))


def evaluate_lane_alerts(
    instance: dg.DagsterInstance,
    kafka: KafkaResource,
    lake: DeltaLakeResource,
    alerting: AlertingResource,
    progress: LakeProgress | None,
    now: datetime,
) -> tuple[list[Alert], LakeProgress | None]:
    """The alerts "Ingest Run Failed", "Revenue Refresh Failed" and "Ingest Stalled", and
    the stall clock to keep."""
    since = now - timedelta(minutes=RUN_FAILED_WINDOW_MINUTES)
    location = lake.location()
    alerts = [
        ingest_run_failed_alert(
            finished_lane_runs(instance, since), now=now, window_minutes=RUN_FAILED_WINDOW_MINUTES
        ),
        evaluate_refresh_alert(instance, location, now),
    ]
    generation = current_generation(location, kafka.topic)
    topic = generation.key if generation else kafka.topic
    try:
        with kafka.client() as client:
            marks = client.watermarks(topic)
    except KafkaUnavailableError:
        # Lag unknown: "Ingest Stalled" is not evaluated and keeps its delivered state
        # ("High Billing Event Lag" reports the broker).
        return alerts, progress
    committed = committed_offsets(location.open(RAW_TABLE), topic, sorted(marks))
    lag = sum(consumer_lag(marks, committed).values())
    progress = track_progress(progress, committed, lag, now)
    alerts.append(
        ingest_stalled_alert(
            lag, progress.since, now=now, stall_minutes=alerting.stall_alert_minutes
        )
    )
    return alerts, progress


def held_batches(instance: dg.DagsterInstance) -> dict[str, str]:
    """Runs the circuit breaker held (found by their tag, whoever launched them) with no
    successful ingest run after them."""
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, INGEST_KINDS

    held = instance.get_run_records(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], tags={BREAKER_TAG: HELD}),
        limit=20,
    )
    if not held:
        return {}
    succeeded = instance.get_run_records(
        dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.SUCCESS],
            tags={INGEST_CONCURRENCY_TAG: list(INGEST_KINDS)},
        ),
        limit=1,
    )
    records = sorted([*held, *succeeded], key=lambda r: r.create_timestamp, reverse=True)
    return open_holds(
        [
            IngestRunOutcome(
                r.dagster_run.run_id,
                r.dagster_run.status == dg.DagsterRunStatus.SUCCESS,
                r.dagster_run.tags.get(BREAKER_RULE_TAG, "")
                if r.dagster_run.tags.get(BREAKER_TAG) == HELD
                else None,
            )
            for r in records
        ]
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
            "running, validation failure rate > 0.01 % over 5 minutes, ingest runs failing, "
            "ingest stalled, revenue refresh failing or behind. Notifies the log (and "
            "BILLING_ALERT_WEBHOOK_URL) when an alert starts or stops firing, until "
            "delivered; runbooks in docs/runbooks/."
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
        state = load_sensor_state(context.cursor)
        alerts = evaluate_alerts(context.instance, kafka, lake, alerting, analytics, postgres)
        lane, progress = evaluate_lane_alerts(
            context.instance, kafka, lake, alerting, state.progress, datetime.now(UTC)
        )
        alerts += lane
        # At least once: an alert whose delivery failed stays pending in the cursor.
        delivered, errors = deliver(alerting.notifiers(context.log), state.delivered, alerts)
        for error in errors:
            context.log.error(error)
        context.update_cursor(dump_sensor_state(SensorState(delivered, progress)))
        firing = [a.title for a in alerts if a.firing]
        return dg.SkipReason(("firing: " + ", ".join(firing)) if firing else "all alerts quiet")

    return billing_alerts_sensor
