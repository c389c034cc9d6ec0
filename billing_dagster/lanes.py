"""Ingest lanes: the topic's partitions in N groups, ingested in parallel.

Partition p is in lane p mod N. Each lane has at most one ingest run in flight (the run
queue's `billing/lane` limit, dev/dagster.yaml), so within a lane batches commit in
offset order as before; lanes run side by side on different workers. Exactly-once stays
per Kafka partition (the lake's app transactions, Postgres' balance_offsets), so lanes
share nothing but the tables: Delta appends from different lanes do not conflict, and
Postgres locks only the lane's own marks rows.

A run's lane tag names the lane and the lane count ("1/4"): after the setting changes, a
run of the old layout still in flight is not mistaken for a lane of the new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from billing_dagster.offsets import OffsetLookup, TickPlan, plan_sensor_tick

#: Run tag: "<lane>/<lanes>" on runs of one lane; "all" on runs that read every partition
#: (replays, repairs), which the run queue also keeps to one at a time.
LANE_TAG = "billing/lane"
ALL_LANES = "all"


def lane_of(partition: int, lanes: int) -> int:
    return partition % lanes


def lane_tag(lane: int, lanes: int) -> str:
    return f"{lane}/{lanes}"


def partitions_of(lane: int, lanes: int, partitions: Iterable[int]) -> list[int]:
    return sorted(p for p in partitions if lane_of(p, lanes) == lane)


def busy_lanes(tags: Iterable[str | None], lanes: int) -> set[int]:
    """The lanes a set of in-flight ingest runs (their lane tags) occupies. A run without
    a lane of this layout (a UI Materialize or backfill of a whole hour, a replay, a run
    of an older lane count) may read any partition: every lane waits for it."""
    busy: set[int] = set()
    for tag in tags:
        lane, _, count = (tag or "").partition("/")
        if count == str(lanes) and lane.isdigit() and int(lane) < lanes:
            busy.add(int(lane))
        else:
            return set(range(lanes))
    return busy


@dataclass(frozen=True)
class LanePlan:
    lane: int
    plan: TickPlan


def plan_lanes(
    topic: str,
    *,
    lanes: int,
    busy: set[int],
    cursor: Mapping[int, int] | None,
    lows: Mapping[int, int],
    ends: Mapping[int, int],
    committed: Mapping[int, int | None],
    start_from: str,
    now: datetime,
    offset_lookup: OffsetLookup,
    max_records_per_run: int,
) -> list[LanePlan]:
    """One sensor tick's plan per lane (offsets.plan_sensor_tick over the lane's
    partitions): a busy lane requests nothing, its new offsets wait for its run."""
    plans = []
    for lane in range(lanes):
        mine = set(partitions_of(lane, lanes, ends))
        if not mine:
            continue
        lane_cursor = None if cursor is None else {p: o for p, o in cursor.items() if p in mine}
        plans.append(
            LanePlan(
                lane,
                plan_sensor_tick(
                    topic,
                    cursor=lane_cursor,
                    lows={p: o for p, o in lows.items() if p in mine},
                    ends={p: o for p, o in ends.items() if p in mine},
                    committed={p: o for p, o in committed.items() if p in mine},
                    runs_in_flight=lane in busy,
                    start_from=start_from,
                    now=now,
                    offset_lookup=offset_lookup,
                    max_records_per_run=max_records_per_run,
                ),
            )
        )
    return plans
