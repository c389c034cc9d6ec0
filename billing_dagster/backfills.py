"""Asset backfills launched from the command line into the Dagster instance the daemon
serves ($DAGSTER_HOME), so they appear under Backfills in the UI like any launched there."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg
from dagster._core.execution.backfill import (
    BULK_ACTION_TERMINAL_STATUSES,
    BulkActionStatus,
    PartitionBackfill,
)
from dagster._core.utils import make_new_backfill_id

from billing_dagster.operations import OperationError


def dagster_instance() -> dg.DagsterInstance:
    if not os.environ.get("DAGSTER_HOME"):
        raise OperationError(
            "DAGSTER_HOME is not set: backfills go to the Dagster instance the daemon serves "
            "(the folder holding dagster.yaml, as for `dagster dev`)"
        )
    return dg.DagsterInstance.get()


def launch_backfill(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    assets: Sequence[dg.AssetKey],
    partition_keys: Sequence[str],
    *,
    title: str,
    tags: dict[str, str],
) -> str:
    """Add an asset backfill of these partitions; the daemon launches its runs."""
    graph = defs.resolve_asset_graph()
    partitions = graph.get(assets[0]).partitions_def
    if partitions is None:
        raise OperationError(f"{assets[0].to_user_string()} is not partitioned")
    known = set(partitions.get_partition_keys(dynamic_partitions_store=instance))
    unknown = [k for k in partition_keys if k not in known]
    if unknown:
        raise OperationError(
            f"{assets[0].to_user_string()} has no partition {unknown[0]!r} "
            f"(keys look like {next(iter(sorted(known)), '?')!r})"
        )
    backfill_id = make_new_backfill_id()
    instance.add_backfill(
        PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=graph,
            partition_names=list(partition_keys),
            asset_selection=list(assets),
            backfill_timestamp=time.time(),
            tags=tags,
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=title,
            description=None,
            run_config=None,
        )
    )
    return backfill_id


@dataclass(frozen=True)
class BackfillOutcome:
    backfill_id: str
    status: str
    runs: int
    failed_runs: int

    @property
    def succeeded(self) -> bool:
        return self.status in (BulkActionStatus.COMPLETED_SUCCESS.value, "COMPLETED") and not (
            self.failed_runs
        )


def wait_for_backfill(
    instance: dg.DagsterInstance,
    backfill_id: str,
    *,
    timeout_s: float,
    on_progress: Callable[[int], None] = lambda _: None,
) -> BackfillOutcome:
    """Poll until the daemon has finished the backfill; `on_progress` gets runs finished."""
    deadline = time.monotonic() + timeout_s
    finished_before = 0
    while True:
        backfill = instance.get_backfill(backfill_id)
        runs = instance.get_runs(dg.RunsFilter.for_backfill(backfill_id))
        finished = [r for r in runs if r.is_finished]
        if len(finished) > finished_before:
            on_progress(len(finished) - finished_before)
            finished_before = len(finished)
        failed = sum(1 for r in runs if r.status == dg.DagsterRunStatus.FAILURE)
        done = backfill is not None and backfill.status in BULK_ACTION_TERMINAL_STATUSES
        if done and len(finished) == len(runs):
            return BackfillOutcome(backfill_id, backfill.status.value, len(runs), failed)
        if time.monotonic() > deadline:
            raise OperationError(
                f"backfill {backfill_id} did not finish in {timeout_s:.0f}s (is the Dagster "
                "daemon running?); it continues, see Backfills in the UI"
            )
        time.sleep(1)
