"""The ingest lane as Dagster's run storage shows it: which runs ingest offsets, whoever
launched them, and which runs belong to the lane at all.

A run launched from the UI (Materialize, a backfill, a re-execution) carries neither the
ingest job's name nor the `billing/ingest` tag; what it executes (its steps, its asset
selection, the concurrency pool of its steps) says whether it is in the lane.
"""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES, DagsterRun

from assets.ingest import (
    BILLING_EVENTS,
    CUSTOMER_BALANCES,
    INGEST_JOB,
    INGEST_OP,
    RAW_BILLING_EVENTS,
    TRANSACTION_HISTORY,
)
from assets.pools import INGEST_POOL, LAKE_POOL
from billing_dagster.alerts import FinishedRun
from billing_dagster.circuit_breaker import BREAKER_TAG, HELD
from billing_dagster.revenue_refresh import REFRESH_KIND

#: A run counts as in flight from the moment the queue holds it.
WAITING_OR_RUNNING = [dg.DagsterRunStatus.QUEUED, *IN_PROGRESS_RUN_STATUSES]
#: The assets of the ingest step: a run materializing any of them reads offsets.
INGEST_ASSET_KEYS = frozenset(
    {RAW_BILLING_EVENTS, BILLING_EVENTS, CUSTOMER_BALANCES, TRANSACTION_HISTORY}
)
#: The kind of every run that ingests, in "Ingest Run Failed".
INGEST = "ingest"
#: Dagster's implicit job of UI materializations (`__ASSET_JOB`, or one per partitions
#: definition in older code locations).
_IMPLICIT_ASSET_JOB = "__ASSET_JOB"


def ingests(run: DagsterRun) -> bool:
    """Whether the run executes the ingest step: the sensor's, a replay or backfill, a
    Materialize of an ingest asset from the UI, a re-execution of any of these."""
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG, INGEST_KINDS

    if run.step_keys_to_execute is not None:  # a re-execution of chosen steps
        return any(key.split("[")[0] == INGEST_OP for key in run.step_keys_to_execute)
    if run.tags.get(INGEST_CONCURRENCY_TAG) in INGEST_KINDS:
        return True
    if run.asset_selection is not None:
        return bool(run.asset_selection & INGEST_ASSET_KEYS)
    return run.job_name == INGEST_JOB or run.job_name.startswith(_IMPLICIT_ASSET_JOB)


def lane_kind(run: DagsterRun) -> str | None:
    """INGEST, the lane's other kinds (reconcile, invariants, maintenance, or the job's
    name for a UI launch of one of their assets), or None: the run is not in the lane."""
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG

    if ingests(run):
        return INGEST
    if run.tags.get(INGEST_CONCURRENCY_TAG) == REFRESH_KIND:
        return None  # revenue refreshes: not the lane's, "Revenue Refresh Failed" is theirs
    if run.tags.get(INGEST_CONCURRENCY_TAG):
        return run.tags[INGEST_CONCURRENCY_TAG]
    pools = run.run_op_concurrency.all_pools if run.run_op_concurrency else None
    return run.job_name if pools and {INGEST_POOL, LAKE_POOL} & set(pools) else None


def ingest_runs_in_flight(instance: dg.DagsterInstance) -> list[DagsterRun]:
    """Runs that ingest, queued or in progress (a handful: the lane runs one at a time)."""
    return [
        run for run in instance.get_runs(dg.RunsFilter(statuses=WAITING_OR_RUNNING)) if ingests(run)
    ]


def _message(
    instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType, *, first: bool = False
) -> str:
    """The first line of the run's last (or first) event of that kind."""
    records = instance.get_records_for_run(run_id, of_type=kind, limit=1, ascending=first).records
    if not records:
        return ""
    entry = records[0].event_log_entry
    text = entry.message or ""
    if kind == dg.DagsterEventType.STEP_FAILURE:
        data = entry.dagster_event.step_failure_data
        text = (data.user_failure_data.description if data.user_failure_data else None) or (
            data.error.message if data.error else ""
        )
    return text.strip().splitlines()[0][:300] if text and text.strip() else ""


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    """Why a run failed, first line: its failed step's error (a Failure's description),
    else why it was canceled (the maximum runtime) and the run failure's own message (a
    worker that died, a run forcibly marked as failed)."""
    step = _message(instance, run_id, dg.DagsterEventType.STEP_FAILURE)
    if step:
        return step
    engine = _message(instance, run_id, dg.DagsterEventType.ENGINE_EVENT)
    parts = (
        # The first says why ("Canceling due to exceeding maximum runtime of N seconds.").
        _message(instance, run_id, dg.DagsterEventType.RUN_CANCELING, first=True),
        # The code server's word on a worker that died ("... terminated by signal 9").
        engine if "Run execution process" in engine else "",
        _message(instance, run_id, dg.DagsterEventType.RUN_FAILURE),
    )
    return "; ".join(part for part in parts if part)


def finished_lane_runs(instance: dg.DagsterInstance, since: datetime) -> list[FinishedRun]:
    """The lane's runs that succeeded or failed since `since`, failures with their message."""
    records = instance.get_run_records(
        dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE],
            updated_after=since,
        ),
        limit=500,
    )
    found = []
    for record in records:
        run = record.dagster_run
        kind = lane_kind(run)
        # A batch the circuit breaker held has its own alert, naming what to do.
        if kind is None or run.tags.get(BREAKER_TAG) == HELD:
            continue
        ended = record.end_time or record.update_timestamp.timestamp()
        succeeded = run.status == dg.DagsterRunStatus.SUCCESS
        found.append(
            FinishedRun(
                run_id=run.run_id,
                kind=kind,
                succeeded=succeeded,
                ended_at=datetime.fromtimestamp(ended, UTC),
                message="" if succeeded else failure_message(instance, run.run_id),
            )
        )
    return found
