"""Offset bookkeeping: which Kafka offsets a micro-batch covers, as plain data.

Dagster partitions are hours of the Kafka log. The offsets of hour H on a partition are
[first offset with timestamp >= H, first offset with timestamp >= H+1h): Kafka's time
index makes this lookup stable once the hour has data, so an hour can always be turned
back into the same offset ranges for a rerun or a replay.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

HOUR = timedelta(hours=1)
HOUR_KEY_FORMAT = "%Y-%m-%d-%H:00"


def hour_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_key(moment: datetime) -> str:
    return hour_start(moment).strftime(HOUR_KEY_FORMAT)


def parse_hour_key(key: str) -> datetime:
    return datetime.strptime(key, HOUR_KEY_FORMAT).replace(tzinfo=UTC)


@dataclass(frozen=True, order=True)
class OffsetRange:
    """Offsets [start, end) of one Kafka partition."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


@dataclass(frozen=True)
class PlannedBatch:
    """One run's worth of offsets, labelled with the log hour they belong to."""

    topic: str
    partition_key: str
    ranges: tuple[OffsetRange, ...]

    @property
    def size(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def run_key(self) -> str:
        # Same offsets, same key: Dagster then never launches a second run for them.
        spec = ",".join(f"{r.partition}:{r.start}-{r.end}" for r in self.ranges)
        digest = hashlib.sha1(spec.encode()).hexdigest()[:16]
        return f"{self.topic}:{self.partition_key}:{digest}"


#: offset_lookup(moment) -> {partition: first offset with timestamp >= moment, or None}
OffsetLookup = Callable[[datetime], Mapping[int, int | None]]


def split_by_log_hour(
    topic: str,
    starts: Mapping[int, int],
    ends: Mapping[int, int],
    now: datetime,
    offset_lookup: OffsetLookup,
    *,
    max_hours: int = 24 * 8,
) -> list[PlannedBatch]:
    """Cut the offsets [starts, ends) at hour boundaries, walking back from `now`'s hour.

    Costs one time-index lookup per hour spanned; data older than `max_hours` is given
    to the oldest hour examined rather than looked up hour by hour.
    """
    upper = {p: ends[p] for p in ends}
    batches: list[PlannedBatch] = []
    hour = hour_start(now)
    for step in range(max_hours):
        last_step = step == max_hours - 1
        boundary = {} if last_step else offset_lookup(hour)
        ranges = []
        for partition, high in upper.items():
            low = starts.get(partition, high)
            first_of_hour = boundary.get(partition)
            if last_step:
                first_of_hour = low
            elif first_of_hour is None or first_of_hour > high:
                first_of_hour = high
            begin = max(low, first_of_hour)
            if begin < high:
                ranges.append(OffsetRange(partition, begin, high))
            upper[partition] = min(high, max(low, first_of_hour))
        if ranges:
            batches.append(PlannedBatch(topic, hour_key(hour), tuple(sorted(ranges))))
        if all(upper[p] <= starts.get(p, upper[p]) for p in upper):
            break
        hour -= HOUR
    return list(reversed(batches))


def chunk_batch(batch: PlannedBatch, max_records: int) -> list[PlannedBatch]:
    """Split a batch so no run reads more than about `max_records` records."""
    pieces = -(-batch.size // max_records) if max_records > 0 else 1
    if pieces <= 1:
        return [batch]
    chunks: list[list[OffsetRange]] = [[] for _ in range(pieces)]
    for r in batch.ranges:
        step = -(-r.size // pieces)
        for index in range(pieces):
            start = r.start + index * step
            end = min(r.end, start + step)
            if start < end:
                chunks[index].append(OffsetRange(r.partition, start, end))
    return [
        PlannedBatch(batch.topic, batch.partition_key, tuple(chunk)) for chunk in chunks if chunk
    ]


@dataclass(frozen=True)
class ReadPlan:
    """What a run actually reads once the lake's committed offsets are known."""

    reads: tuple[OffsetRange, ...]
    already_committed: tuple[OffsetRange, ...]
    gaps_covered: tuple[OffsetRange, ...]
    #: Requested offsets retention deleted before the lake read them: [lake's mark, low
    #: watermark) per partition, left out of the reads (billing_dagster/lost_offsets.py).
    lost: tuple[OffsetRange, ...] = ()

    @property
    def size(self) -> int:
        return sum(r.size for r in self.reads)


def plan_reads(requested: Iterable[OffsetRange], committed: Mapping[int, int | None]) -> ReadPlan:
    """Resume each requested range at the lake's committed offset.

    - committed >= end: the range is done; nothing is read (a rerun is a no-op).
    - start <= committed < end: read only the part not yet committed (a retried crash).
    - committed < start: an earlier range never committed (its run failed); read from
      the committed offset so nothing is skipped, and report the gap.
    """
    reads, done, gaps = [], [], []
    for r in requested:
        mark = committed.get(r.partition)
        if mark is None:
            reads.append(r)
        elif mark >= r.end:
            done.append(r)
        else:
            reads.append(OffsetRange(r.partition, mark, r.end))
            if mark < r.start:
                gaps.append(OffsetRange(r.partition, mark, r.start))
    return ReadPlan(tuple(reads), tuple(done), tuple(gaps))


def ranges_to_text(ranges: Iterable[OffsetRange]) -> str:
    return " ".join(f"{r.partition}:{r.start}-{r.end}" for r in ranges)


def ranges_from_text(text: str) -> tuple[OffsetRange, ...]:
    """The inverse of ranges_to_text ("3:10-20 4:0-5")."""
    ranges = []
    for item in text.split():
        partition, span = item.split(":")
        start, end = span.split("-")
        ranges.append(OffsetRange(int(partition), int(start), int(end)))
    return tuple(ranges)


def ranges_to_json(ranges: Iterable[OffsetRange]) -> str:
    return json.dumps([[r.partition, r.start, r.end] for r in ranges])


def ranges_for_hour(
    hour: datetime, offset_lookup: OffsetLookup, ends: Mapping[int, int]
) -> tuple[OffsetRange, ...]:
    """The offsets of one log hour: from the hour's first offset to the next hour's."""
    first = offset_lookup(hour_start(hour))
    after = offset_lookup(hour_start(hour) + HOUR)
    ranges = []
    for partition, end in sorted(ends.items()):
        start = first.get(partition)
        stop = after.get(partition)
        start = end if start is None else start
        stop = end if stop is None else stop
        if start < stop:
            ranges.append(OffsetRange(partition, start, stop))
    return tuple(ranges)


class TopicResetError(RuntimeError):
    """The lake is ahead of the topic: the topic was recreated or truncated."""


def check_topic_not_reset(
    topic: str, committed: Mapping[int, int | None], ends: Mapping[int, int]
) -> None:
    for partition, mark in committed.items():
        end = ends.get(partition, 0)
        if mark is not None and mark > end:
            raise TopicResetError(
                f"the lake has processed {topic}/{partition} up to offset {mark}, but the "
                f"topic ends at {end}: the topic was deleted and recreated or truncated. New "
                "records there would be mistaken for processed ones; point BILLING_LAKE_ROOT "
                "at a new lake or restore the topic."
            )


@dataclass(frozen=True)
class TickPlan:
    batches: tuple[PlannedBatch, ...]
    cursor: dict[int, int]
    recovering: bool
    #: Partitions the lake has never seen, with the offset processing starts from. The
    #: sensor records these in the lake before requesting runs, so that if the very first
    #: run fails, later runs still know where processing began and cover its offsets.
    origins: dict[int, int]


def waits_for_run(cursor: Mapping[int, int] | None, runs_in_flight: bool) -> bool:
    """Whether a tick requests nothing because an ingest run is queued or running.

    Ingest runs go one at a time, so what arrives meanwhile waits for one run when that
    ends, instead of queueing a run per tick that each pays the fixed cost of a run
    (batches grow with the load; the lag stays bounded). The first tick (no cursor) still
    records where processing starts."""
    return cursor is not None and runs_in_flight


def plan_sensor_tick(
    topic: str,
    *,
    cursor: Mapping[int, int] | None,
    lows: Mapping[int, int],
    ends: Mapping[int, int],
    committed: Mapping[int, int | None],
    runs_in_flight: bool,
    start_from: str,
    now: datetime,
    offset_lookup: OffsetLookup,
    max_records_per_run: int,
) -> TickPlan:
    """Decide the runs for one sensor tick.

    The cursor holds the offsets already *requested*; the lake holds those *committed*.
    Normally a tick requests [cursor, end), unless it waits for a run (`waits_for_run`).
    When no run is queued or running and the lake is behind the cursor (a run failed for
    good, or crashed), the tick re-requests from the lake's offsets, so nothing requested
    is ever left behind.
    """
    check_topic_not_reset(topic, committed, ends)

    def initial(partition: int) -> int:
        mark = committed.get(partition)
        if mark is not None:
            return mark
        return lows.get(partition, 0) if start_from == "earliest" else ends[partition]

    starts = {p: initial(p) if cursor is None or p not in cursor else cursor[p] for p in ends}
    origins = {p: starts[p] for p in ends if committed.get(p) is None}
    if waits_for_run(cursor, runs_in_flight):
        return TickPlan((), {**cursor, **starts}, False, origins)
    recovering = False
    if cursor is not None:
        for partition, mark in committed.items():
            if mark is not None and mark < starts.get(partition, mark):
                starts[partition] = mark
                recovering = True
    requested = {p: max(starts[p], ends[p]) for p in ends}
    pending = {p: e for p, e in ends.items() if e > starts[p]}
    if not pending:
        return TickPlan((), requested, recovering, origins)
    batches = [
        chunk
        for batch in split_by_log_hour(topic, starts, pending, now, offset_lookup)
        for chunk in chunk_batch(batch, max_records_per_run)
    ]
    return TickPlan(tuple(batches), requested, recovering, origins)


def consumer_lag(
    watermarks: Mapping[int, tuple[int, int]], committed: Mapping[int, int | None]
) -> dict[int, int]:
    """Records per partition not yet processed into the lake: end offset less the lake's
    next offset (the first retained offset where the lake has never seen the partition)."""
    lag = {}
    for partition, (low, high) in watermarks.items():
        mark = committed.get(partition)
        lag[partition] = max(0, high - (low if mark is None else max(mark, low)))
    return lag


# ---- re-requests of offsets whose run failed --------------------------------------------

#: The first re-request from unchanged lake offsets goes at once; each further one waits
#: twice as long as the one before, from RETRY_FIRST_DELAY up to RETRY_MAX_DELAY.
RETRY_FIRST_DELAY = timedelta(seconds=30)
RETRY_MAX_DELAY = timedelta(minutes=15)


@dataclass(frozen=True)
class RetryState:
    """Re-requests made since the lake's offsets last moved (kept in the sensor cursor)."""

    #: The lake's committed offsets the re-requests start from ("partition:offset ...").
    marks: str
    #: How many re-requests were made from them.
    attempt: int
    #: When the last one was made.
    at: datetime


def marks_text(committed: Mapping[int, int | None]) -> str:
    return " ".join(f"{p}:{o}" for p, o in sorted(committed.items()) if o is not None)


def retry_delay(attempt: int) -> timedelta:
    """The wait after re-request `attempt` (1, 2, ...) before the next one."""
    doublings = min(max(0, attempt - 1), 20)  # 2**20 x 30 s is far past the maximum
    return min(RETRY_FIRST_DELAY * 2**doublings, RETRY_MAX_DELAY)


def next_retry(
    previous: RetryState | None, committed: Mapping[int, int | None], now: datetime
) -> RetryState | None:
    """The re-request to make now for offsets a failed run left, or None: back off.

    When the lake's offsets moved since the last re-request (some run committed), this is
    a new failure: the first re-request goes at once. When they did not, the batch keeps
    failing (a tripped circuit breaker, Postgres down for long): each further re-request
    waits `retry_delay` longer, so it is not relaunched on every tick."""
    marks = marks_text(committed)
    if previous is None or previous.marks != marks:
        return RetryState(marks, 1, now)
    if now < previous.at + retry_delay(previous.attempt):
        return None
    return RetryState(marks, previous.attempt + 1, now)


def retry_run_key(batch: PlannedBatch, retry: RetryState) -> str:
    """A re-request's run key. The same offsets give the same PlannedBatch.run_key, and
    Dagster skips a run key it has seen, so a failed run's offsets on a quiet topic would
    never run again: the attempt and its time make each re-request's key new."""
    return f"{batch.run_key}:retry-{retry.attempt}-{int(retry.at.timestamp())}"
