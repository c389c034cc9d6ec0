"""What operators ask of the platform: where each Kafka partition stands against the lake,
and which log hours and offsets a replay of a time range covers.

A replay never forces anything: it is a backfill of the ingest assets' log-hour partitions,
and each run takes only the offsets of its hour the lake has not committed (Delta app
transactions on raw/), so replaying processed data changes nothing and replaying a gap
fills it, whatever the live sensor does at the same time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from billing_dagster.log_time import HiddenRecords
from billing_dagster.lost_offsets import lost_offsets
from billing_dagster.offsets import (
    HOUR,
    OffsetLookup,
    OffsetRange,
    hour_key,
    hour_start,
    ranges_for_hour,
)
from billing_dagster.projection import processed_offsets


class OperationError(ValueError):
    """An operator's request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class PartitionStatus:
    partition: int
    low: int
    end: int
    #: Next offset not yet in both stores: min(raw/'s mark, Postgres' mark); None before
    #: the lake has seen the partition.
    processed: int | None
    #: The two stores' own marks (serving None: Postgres out of reach).
    lake: int | None = None
    serving: int | None = None
    #: Offsets retention deleted before the lake read them, not acknowledged: [lake, low).
    lost: tuple[int, int] | None = None

    @property
    def lag(self) -> int:
        return self.end - (self.low if self.processed is None else self.processed)


def partition_status(
    marks: Mapping[int, tuple[int, int]],
    committed: Mapping[int, int | None],
    serving: Mapping[int, int] | None = None,
) -> list[PartitionStatus]:
    """`committed`: raw/'s marks; `serving`: Postgres' (None: unknown)."""
    processed = processed_offsets(committed, serving)
    lost = lost_offsets(committed, {p: low for p, (low, _) in marks.items()})
    return [
        PartitionStatus(
            p,
            low,
            end,
            processed.get(p),
            committed.get(p),
            None if serving is None else serving.get(p, 0),
            lost.get(p),
        )
        for p, (low, end) in sorted(marks.items())
    ]


@dataclass(frozen=True)
class HourPlan:
    partition_key: str
    ranges: tuple[OffsetRange, ...]
    #: Records of those ranges already committed to the lake (a replay skips them).
    already_processed: int

    @property
    def records(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def to_process(self) -> int:
        return self.records - self.already_processed


@dataclass(frozen=True)
class ReplayPlan:
    topic: str
    start: datetime
    end: datetime
    hours: tuple[HourPlan, ...] = field(default_factory=tuple)
    #: Hours whose offsets may miss records: the time index is not monotonic there
    #: (billing_dagster/log_time.py); those records need a replay by offsets.
    hidden: tuple[HiddenRecords, ...] = ()

    @property
    def partition_keys(self) -> list[str]:
        return [h.partition_key for h in self.hours]

    @property
    def records(self) -> int:
        return sum(h.records for h in self.hours)

    @property
    def already_processed(self) -> int:
        return sum(h.already_processed for h in self.hours)

    def to_json(self) -> dict[str, object]:
        return {
            "topic": self.topic,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "records": self.records,
            "already_processed": self.already_processed,
            "to_process": self.records - self.already_processed,
            "partitions": [
                {
                    "partition_key": h.partition_key,
                    "records": h.records,
                    "already_processed": h.already_processed,
                    "ranges": [[r.partition, r.start, r.end] for r in h.ranges],
                }
                for h in self.hours
            ],
            "hidden_records": [
                {
                    "partition_key": h.partition_key,
                    "partition": h.partition,
                    "offset": h.offset,
                    "timestamp": h.timestamp.isoformat(),
                    "next_timestamp": h.next_timestamp.isoformat(),
                    "replay_offsets": [h.partition, h.offset, h.end],
                }
                for h in self.hidden
            ],
        }


def parse_moment(text: str, option: str) -> datetime:
    """An ISO-8601 time (UTC when it has no offset), or a date meaning its midnight UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise OperationError(
            f"{option} must be a time like 2024-12-15T10:00 or 2024-12-15, got '{text}'"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def log_hours(start: datetime, end: datetime) -> list[datetime]:
    """The log hours overlapping [start, end)."""
    if start >= end:
        raise OperationError(
            f"--from ({start.isoformat()}) must be before --to ({end.isoformat()})"
        )
    hours, hour = [], hour_start(start)
    while hour < end:
        hours.append(hour)
        hour += HOUR
    return hours


def plan_replay(
    topic: str,
    start: datetime,
    end: datetime,
    *,
    offset_lookup: OffsetLookup,
    ends: Mapping[int, int],
    committed: Mapping[int, int | None],
    progress: Callable[[int], None] = lambda _: None,
) -> ReplayPlan:
    """Each log hour of [start, end) with its offsets and how many the lake already has.
    Whole hours: an hour is the unit a run (and the UI) processes."""
    plans = []
    for hour in log_hours(start, end):
        ranges = ranges_for_hour(hour, offset_lookup, ends)
        done = 0
        for r in ranges:
            mark = committed.get(r.partition)
            if mark is not None:
                done += max(0, min(mark, r.end) - r.start)
        plans.append(HourPlan(hour_key(hour), ranges, done))
        progress(1)
    return ReplayPlan(topic, start, end, tuple(p for p in plans if p.records))
