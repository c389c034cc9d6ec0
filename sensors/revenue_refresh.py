"""revenue_refresh_sensor: one coalescing `refresh_revenue` run for whatever billing_events
holds beyond the aggregates, never while one is queued or running (the decision:
billing_dagster/revenue_refresh.py decide_refresh). Also what the alerts sensor and
`billing-dagster status` read about refresh runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from billing_dagster.alerts import Alert, FinishedRun
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.revenue_refresh import (
    REFRESH_KIND,
    decide_refresh,
    revenue_refresh_alert,
    revenue_state,
)
from resources import DeltaLakeResource
from sensors.lane import failure_message

#: "Revenue Refresh Failed" looks at refresh runs that ended this long ago at most.
RUN_WINDOW_MINUTES = 60


def _refresh_tags() -> dict[str, str]:
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG

    return {INGEST_CONCURRENCY_TAG: REFRESH_KIND}


def refresh_runs_in_flight(instance: dg.DagsterInstance) -> int:
    """Refresh runs queued or in progress (the sensor's, or the job launched by hand)."""
    statuses = [dg.DagsterRunStatus.QUEUED, *IN_PROGRESS_RUN_STATUSES]
    return len(instance.get_run_ids(dg.RunsFilter(statuses=statuses, tags=_refresh_tags())))


def finished_refresh_runs(instance: dg.DagsterInstance, since: datetime) -> list[FinishedRun]:
    """Refresh runs that succeeded or failed since `since`, failures with their message."""
    records = instance.get_run_records(
        dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE],
            tags=_refresh_tags(),
            updated_after=since,
        ),
        limit=200,
    )
    return [
        FinishedRun(
            run_id=record.dagster_run.run_id,
            kind=REFRESH_KIND,
            succeeded=record.dagster_run.status == dg.DagsterRunStatus.SUCCESS,
            ended_at=datetime.fromtimestamp(
                record.end_time or record.update_timestamp.timestamp(), UTC
            ),
            message=""
            if record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
            else failure_message(instance, record.dagster_run.run_id),
        )
        for record in records
    ]


def evaluate_refresh_alert(
    instance: dg.DagsterInstance, lake: LakeLocation, now: datetime
) -> Alert:
    """The alert "Revenue Refresh Failed": a refresh run failed, or the aggregates lag."""
    since = now - timedelta(minutes=RUN_WINDOW_MINUTES)
    return revenue_refresh_alert(
        finished_refresh_runs(instance, since), revenue_state(lake), now=now
    )


def build_revenue_refresh_sensor(job: dg.JobDefinition, interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="revenue_refresh_sensor",
        job=job,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Requests one refresh_revenue run when billing_events has a version the revenue "
            "aggregates do not reflect and no refresh is queued or running: however many "
            "batches landed, one refresh takes them all. Cursor: the last version requested."
        ),
    )
    def revenue_refresh_sensor(
        context: dg.SensorEvaluationContext, lake: DeltaLakeResource
    ) -> dg.SensorResult | dg.SkipReason:
        last = int(context.cursor) if context.cursor and context.cursor.isdigit() else None
        in_flight = refresh_runs_in_flight(context.instance)
        # In flight: nothing to decide, and no reason to read the lake.
        state = revenue_state(lake.location(), with_lag=False) if not in_flight else None
        decision = decide_refresh(
            state.current if state else None, state.reflected if state else None, in_flight, last
        )
        if decision.version is None:
            return dg.SkipReason(decision.reason)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"billing_events@{decision.version}",
                    tags={"billing/billing_events_version": str(decision.version)},
                )
            ],
            cursor=str(decision.version),
        )

    return revenue_refresh_sensor
