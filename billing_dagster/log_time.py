"""Log hours that mean something: finding where a topic's time index is not monotonic.

A log hour H is the offsets [offsets_for_times(H), offsets_for_times(H+1h)) of each
partition (billing_dagster/offsets.py). Kafka answers offsets_for_times(T) with the first
offset whose timestamp is at or after T. On a CreateTime topic the producer sets the
timestamps, so one record dated in the future is that answer for every hour up to its
date: the records after it fall into no earlier hour, and a replay of those hours reads
nothing and would report success. Topics this tool creates use LogAppendTime, where the
broker's clock stamps records and this cannot happen; on any other topic the hours a
replay or a UI launch plans are checked here, and the hours that may hide records are
reported with the way out: a replay by offsets.

The check costs one more lookup per hour, and reads two records only where a partition's
hour boundary is dated well past the hour's end (a quiet partition, or a future-dated
record).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from billing_dagster.kafka_io import LOG_APPEND_TIME, KafkaClient
from billing_dagster.offsets import HOUR, OffsetLookup, OffsetRange, hour_key, hour_start

#: Producers' clocks and batching put CreateTime records slightly out of order; only a
#: record dated this far past the next one is taken for a broken index.
TOLERATED_DISORDER = timedelta(minutes=15)

#: {partition: [offset, ...]} -> {(partition, offset): timestamp} for each offset and the
#: one after it (where they exist).
TimestampReader = Callable[[Mapping[int, Sequence[int]]], Mapping[tuple[int, int], datetime]]


class RecordingLookup:
    """An OffsetLookup that asks each moment once and keeps the answers."""

    def __init__(self, lookup: OffsetLookup) -> None:
        self._lookup = lookup
        self.answers: dict[datetime, dict[int, int | None]] = {}

    def __call__(self, moment: datetime) -> dict[int, int | None]:
        if moment not in self.answers:
            self.answers[moment] = dict(self._lookup(moment))
        return self.answers[moment]


@dataclass(frozen=True)
class HiddenRecords:
    """Log hour `partition_key` on `partition` may miss records: `offset`, its end
    boundary, is dated `timestamp` (well past the hour's end), and the record after it is
    dated `next_timestamp`, before the hour's end."""

    partition_key: str
    partition: int
    offset: int
    timestamp: datetime
    next_timestamp: datetime
    #: The partition's end offset when checked (the replay by offsets goes up to it).
    end: int

    def describe(self, topic: str) -> str:
        return (
            f"log hour {self.partition_key} of {topic}/{self.partition} may miss records: "
            f"offset {self.offset} is dated {self.timestamp:%Y-%m-%d %H:%M:%S} UTC, but offset "
            f"{self.offset + 1} after it is dated {self.next_timestamp:%Y-%m-%d %H:%M:%S} UTC, "
            "before the hour's end (a producer's timestamp on a CreateTime topic: the time "
            "index is not monotonic, so hours up to that date cannot reach the records behind "
            f"offset {self.offset}). Replay by offsets instead: launch job ingest_billing_events "
            f"with config ops.ingest_billing_batch.config = {{topic: '{topic}', ranges: "
            f"[{{partition: {self.partition}, start: {self.offset}, end: {self.end}}}]}} "
            "(offsets the lake holds are skipped)"
        )

    @property
    def range(self) -> OffsetRange:
        return OffsetRange(self.partition, self.offset, self.end)


def hidden_records(
    hours: Sequence[datetime],
    lookup: OffsetLookup,
    ends: Mapping[int, int],
    timestamps_at: TimestampReader,
) -> list[HiddenRecords]:
    """The (hour, partition) pairs of `hours` whose offsets may miss records.

    X = lookup(H+1h) ends hour H on a partition. When lookup(H+1h+TOLERATED_DISORDER) is X
    too, X is dated well past H's end, and if the record after X is dated before H's end,
    the index is not monotonic at X: what follows X up to X's date is in no hour before it."""
    candidates: dict[tuple[int, int], list[datetime]] = defaultdict(list)
    for hour in hours:
        first = hour_start(hour)
        boundary = lookup(first + HOUR)
        beyond = lookup(first + HOUR + TOLERATED_DISORDER)
        for partition, offset in boundary.items():
            if (
                offset is not None
                and beyond.get(partition) == offset
                and offset + 1 < ends.get(partition, 0)
            ):
                candidates[(partition, offset)].append(first)
    if not candidates:
        return []
    wanted: dict[int, list[int]] = defaultdict(list)
    for partition, offset in candidates:
        wanted[partition].append(offset)
    stamps = timestamps_at(wanted)
    found = []
    for (partition, offset), starts in sorted(candidates.items()):
        at, after = stamps.get((partition, offset)), stamps.get((partition, offset + 1))
        if at is None or after is None:
            continue
        for first in starts:
            if after < first + HOUR <= at - TOLERATED_DISORDER:
                found.append(
                    HiddenRecords(hour_key(first), partition, offset, at, after, ends[partition])
                )
    return sorted(found, key=lambda h: (h.partition_key, h.partition))


def record_timestamps(
    client: KafkaClient, topic: str, wanted: Mapping[int, Sequence[int]]
) -> dict[tuple[int, int], datetime]:
    """The timestamps of each wanted offset and the one after it, one read per round of at
    most one offset per partition."""
    queues = {p: sorted(set(offsets)) for p, offsets in wanted.items()}
    stamps: dict[tuple[int, int], datetime] = {}
    while any(queues.values()):
        reads = [OffsetRange(p, q[0], q.pop(0) + 2) for p, q in queues.items() if q]
        records, _ = client.read(topic, reads)
        for partition, offset, stamp in records.select(
            "kafka_partition", "kafka_offset", "kafka_timestamp"
        ).iter_rows():
            stamps[(partition, offset)] = stamp
    return stamps


def check_hours(
    client: KafkaClient,
    topic: str,
    hours: Sequence[datetime],
    lookup: OffsetLookup,
    ends: Mapping[int, int],
) -> list[HiddenRecords]:
    """hidden_records for a topic on Kafka; nothing to check on a LogAppendTime topic."""
    if client.timestamp_type(topic) == LOG_APPEND_TIME:
        return []
    return hidden_records(
        hours, lookup, ends, lambda wanted: record_timestamps(client, topic, wanted)
    )
