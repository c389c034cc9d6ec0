"""`release-batch`: commit a batch the circuit breaker held, its rejects to quarantine.

The held run's offsets (its run config) under its log hour, launched again as a Dagster
backfill tagged `billing/circuit-breaker: release`: the run judges the batch as any run
does, but the breaker does not hold it. A backfill, as `replay` launches one, so the
daemon runs it queued in the ingest lane and the UI shows it under Backfills; it is safe
to repeat (offsets the lake already holds are skipped)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from billing_dagster.operations import OperationError
from billing_dagster.settings import load_settings

if TYPE_CHECKING:
    import dagster as dg

#: A release already registered for the run, in these states, is not registered again.
_LIVE_OR_DONE = ("REQUESTED", "COMPLETED", "COMPLETED_SUCCESS")


@dataclass(frozen=True)
class ReleaseRequest:
    """What a release of one held run launches."""

    run_id: str
    partition_key: str
    run_config: Mapping[str, object]
    tags: dict[str, str]
    #: What tripped the breaker (the held run's tag).
    held_for: str


def release_request(run: dg.DagsterRun | None, run_id: str) -> ReleaseRequest:
    """The release of `run`, which must be an ingest run the circuit breaker held."""
    from billing_dagster.circuit_breaker import (
        BREAKER_RULE_TAG,
        BREAKER_TAG,
        HELD,
        RELEASE,
        RELEASED_RUN_TAG,
    )
    from billing_dagster.definitions import INGEST_CONCURRENCY_TAG
    from billing_dagster.lanes import ALL_LANES, LANE_TAG

    if run is None:
        raise OperationError(f"no run {run_id} in this Dagster instance (DAGSTER_HOME)")
    if run.tags.get(BREAKER_TAG) != HELD or run.status.value != "FAILURE":
        raise OperationError(
            f"run {run_id} was not held by the circuit breaker (status {run.status.value}); "
            f"only a failed run tagged {BREAKER_TAG}={HELD} can be released"
        )
    partition_key = run.tags.get("dagster/partition")
    if not partition_key:
        raise OperationError(f"run {run_id} has no log-hour partition to release")
    return ReleaseRequest(
        run_id=run.run_id,
        partition_key=partition_key,
        run_config=dict(run.run_config),
        tags={
            # In the held run's lane: queued behind that lane's runs.
            INGEST_CONCURRENCY_TAG: "replay",
            LANE_TAG: run.tags.get(LANE_TAG, ALL_LANES),
            BREAKER_TAG: RELEASE,
            RELEASED_RUN_TAG: run.run_id,
        },
        held_for=run.tags.get(BREAKER_RULE_TAG, ""),
    )


def _earlier_release(instance: dg.DagsterInstance, run_id: str) -> str | None:
    from dagster._core.execution.backfill import BulkActionsFilter

    from billing_dagster.circuit_breaker import RELEASED_RUN_TAG

    for backfill in instance.get_backfills(
        filters=BulkActionsFilter(tags={RELEASED_RUN_TAG: run_id}), limit=20
    ):
        if backfill.status.value in _LIVE_OR_DONE:
            return f"{backfill.backfill_id} ({backfill.status.value})"
    return None


def _launch_release(instance: dg.DagsterInstance, request: ReleaseRequest) -> str:
    """Register the backfill of the held run's log hour with its offsets as run config."""
    import time

    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    from assets.ingest import (
        BILLING_EVENTS,
        CUSTOMER_BALANCES,
        RAW_BILLING_EVENTS,
        TRANSACTION_HISTORY,
    )
    from billing_dagster.definitions import build_definitions

    graph = build_definitions(load_settings()).resolve_asset_graph()
    backfill_id = make_new_backfill_id()
    instance.add_backfill(
        PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=graph,
            partition_names=[request.partition_key],
            # The money only, as in a sensor-launched run: refresh_revenue follows.
            asset_selection=[
                RAW_BILLING_EVENTS,
                BILLING_EVENTS,
                CUSTOMER_BALANCES,
                TRANSACTION_HISTORY,
            ],
            backfill_timestamp=time.time(),
            tags=request.tags,
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=f"release batch held by run {request.run_id[:8]}",
            description=f"circuit breaker released by an operator: {request.held_for}",
            run_config=dict(request.run_config),
        )
    )
    return backfill_id


@click.command("release-batch")
@click.argument("run_id")
@click.option("--wait/--no-wait", default=False, help="Wait for the release run to finish.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def release_batch(run_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Commit the batch of a run the circuit breaker held, as it is: its rejects go to
    quarantine. For records that really are bad; if the cause was upstream (an FX day not
    loaded, a wrong BILLING_TOPIC_FORMATS), fix that instead and let the sensor retry."""
    import json
    import sys

    from billing_dagster.backfills import dagster_instance, wait_for_backfill

    load_settings()  # a wrong setting is one line, before anything is launched
    instance = dagster_instance()
    request = release_request(instance.get_run_by_id(run_id), run_id)
    earlier = _earlier_release(instance, request.run_id)
    if earlier:
        raise OperationError(f"run {run_id} is already released by backfill {earlier}")
    backfill_id = _launch_release(instance, request)
    report: dict[str, object] = {
        "released_run": request.run_id,
        "held_for": request.held_for,
        "partition": request.partition_key,
        "backfill_id": backfill_id,
    }
    if not as_json:
        click.echo(
            f"released run {request.run_id} ({request.held_for}): backfill {backfill_id} "
            f"commits its batch, rejects to quarantine (UI: /runs/b/{backfill_id})"
        )
    succeeded = True
    if wait:
        outcome = wait_for_backfill(instance, backfill_id, timeout_s=timeout)
        report.update(status=outcome.status, runs=outcome.runs, failed_runs=outcome.failed_runs)
        succeeded = outcome.succeeded
        if not as_json:
            click.echo(f"backfill {backfill_id}: {outcome.status}")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    if not succeeded:
        sys.exit(1)
