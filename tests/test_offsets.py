"""Offset planning: pure functions, no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing_dagster.offsets import (
    RETRY_MAX_DELAY,
    OffsetRange,
    PlannedBatch,
    RetryState,
    TopicResetError,
    chunk_batch,
    next_retry,
    plan_reads,
    plan_sensor_tick,
    ranges_for_hour,
    retry_delay,
    retry_run_key,
    split_by_log_hour,
)

NOW = datetime(2026, 11, 24, 14, 20, tzinfo=UTC)
H14 = datetime(2026, 11, 24, 14, tzinfo=UTC)
H13 = H14 - timedelta(hours=1)


def lookup_from(boundaries: dict[datetime, dict[int, int | None]]):
    return lambda moment: boundaries.get(moment, {})


def test_split_walks_back_over_hour_boundaries():
    # Partition 0: offsets 0-99 in hour 13, 100-149 in hour 14. Partition 1: all in 14.
    lookup = lookup_from({H14: {0: 100, 1: 0}, H13: {0: 0, 1: None}})
    batches = split_by_log_hour("t", {0: 40, 1: 0}, {0: 150, 1: 30}, NOW, lookup)
    assert [(b.partition_key, b.ranges) for b in batches] == [
        ("2026-11-24-13:00", (OffsetRange(0, 40, 100),)),
        ("2026-11-24-14:00", (OffsetRange(0, 100, 150), OffsetRange(1, 0, 30))),
    ]


def test_split_with_no_record_in_current_hour_labels_previous_hour():
    lookup = lookup_from({H14: {0: None}, H13: {0: 0}})
    batches = split_by_log_hour("t", {0: 5}, {0: 9}, NOW, lookup)
    assert [(b.partition_key, b.ranges) for b in batches] == [
        ("2026-11-24-13:00", (OffsetRange(0, 5, 9),))
    ]


def test_split_gives_very_old_backlog_to_oldest_hour_examined():
    # Every looked-up hour starts after the backlog: it all predates the 3 hours examined.
    batches = split_by_log_hour("t", {0: 0}, {0: 10}, NOW, lambda m: {0: 10}, max_hours=3)
    assert len(batches) == 1 and batches[0].ranges == (OffsetRange(0, 0, 10),)
    assert batches[0].partition_key == "2026-11-24-12:00"


def test_chunk_batch_bounds_records_per_run_and_keeps_every_offset():
    batch = PlannedBatch("t", "k", (OffsetRange(0, 0, 1000), OffsetRange(1, 500, 503)))
    chunks = chunk_batch(batch, 300)
    assert all(c.size <= 300 for c in chunks)
    covered = sorted(
        (r.partition, o) for c in chunks for r in c.ranges for o in range(r.start, r.end)
    )
    assert covered == sorted([(0, o) for o in range(1000)] + [(1, o) for o in range(500, 503)])
    assert len({c.run_key for c in chunks}) == len(chunks)


def test_plan_reads_skips_done_resumes_partial_and_covers_gaps():
    plan = plan_reads(
        [
            OffsetRange(0, 0, 10),
            OffsetRange(1, 10, 20),
            OffsetRange(2, 20, 30),
            OffsetRange(3, 5, 9),
        ],
        {0: 10, 1: 15, 2: 12, 3: None},
    )
    assert plan.already_committed == (OffsetRange(0, 0, 10),)
    assert plan.reads == (OffsetRange(1, 15, 20), OffsetRange(2, 12, 30), OffsetRange(3, 5, 9))
    assert plan.gaps_covered == (OffsetRange(2, 12, 20),)


def tick(**overrides):
    arguments = dict(
        cursor=None,
        lows={0: 0, 1: 0},
        ends={0: 10, 1: 0},
        committed={0: None, 1: None},
        runs_in_flight=False,
        start_from="earliest",
        now=NOW,
        offset_lookup=lambda m: {0: 0, 1: None},
        max_records_per_run=1000,
    )
    arguments.update(overrides)
    return plan_sensor_tick("t", **arguments)


def test_first_tick_starts_at_earliest_or_latest_or_the_lakes_offsets():
    assert tick().batches[0].ranges == (OffsetRange(0, 0, 10),)
    assert tick(start_from="latest").batches == ()
    assert tick(start_from="latest").cursor == {0: 10, 1: 0}
    assert tick(committed={0: 7, 1: None}).batches[0].ranges == (OffsetRange(0, 7, 10),)


def test_tick_without_new_offsets_requests_nothing():
    plan = tick(cursor={0: 10, 1: 0}, committed={0: 10, 1: None})
    assert plan.batches == () and plan.cursor == {0: 10, 1: 0}


def test_tick_rerequests_from_lake_when_nothing_is_in_flight():
    stalled = tick(cursor={0: 10, 1: 0}, committed={0: 4, 1: None})
    assert stalled.recovering and stalled.batches[0].ranges == (OffsetRange(0, 4, 10),)
    busy = tick(cursor={0: 10, 1: 0}, committed={0: 4, 1: None}, runs_in_flight=True)
    assert busy.batches == () and not busy.recovering


def test_new_offsets_wait_for_the_run_in_flight_and_then_go_in_one_run():
    busy = tick(cursor={0: 4, 1: 0}, committed={0: 4, 1: None}, runs_in_flight=True)
    assert busy.batches == () and busy.cursor == {0: 4, 1: 0}
    idle = tick(cursor=busy.cursor, committed={0: 4, 1: None})
    assert [b.ranges for b in idle.batches] == [(OffsetRange(0, 4, 10),)]
    assert idle.cursor == {0: 10, 1: 0} and not idle.recovering


def test_tick_refuses_a_topic_that_is_behind_the_lake():
    with pytest.raises(TopicResetError, match="recreated"):
        tick(committed={0: 50, 1: None})


def test_ranges_for_hour_uses_the_next_hours_first_offset_as_end():
    lookup = lookup_from({H13: {0: 3, 1: None}, H14: {0: 8, 1: None}})
    assert ranges_for_hour(H13, lookup, {0: 12, 1: 4}) == (OffsetRange(0, 3, 8),)
    assert ranges_for_hour(H14, lookup, {0: 12, 1: 4}) == (OffsetRange(0, 8, 12),)


def test_a_rerequest_of_failed_offsets_gets_a_new_run_key_and_backs_off():
    # A run for 0:40-90 failed; the topic is quiet, so the re-request plans the same
    # offsets, and the same key Dagster would skip as already launched.
    batch = PlannedBatch("t", "2026-11-24-14:00", (OffsetRange(0, 40, 90),))
    plan = plan_sensor_tick(
        "t",
        cursor={0: 90},
        lows={0: 0},
        ends={0: 90},
        committed={0: 40},
        runs_in_flight=False,
        start_from="earliest",
        now=NOW,
        offset_lookup=lookup_from({H14: {0: 0}}),
        max_records_per_run=1_000,
    )
    assert plan.recovering and plan.batches == (batch,)

    first = next_retry(None, {0: 40}, NOW)
    assert first == RetryState("0:40", 1, NOW)  # at once, the first time
    keys = {batch.run_key, retry_run_key(batch, first)}
    state, waited = first, []
    moment = NOW
    while state.attempt < 8:
        moment += timedelta(seconds=2)  # the sensor ticks every 2 s
        retry = next_retry(state, {0: 40}, moment)
        if retry is None:
            continue
        waited.append(retry.at - state.at)
        keys.add(retry_run_key(batch, retry))
        state = retry
    # Each further re-request waits about twice as long, up to 15 minutes ...
    assert [round(w.total_seconds()) for w in waited] == [30, 60, 120, 240, 480, 900, 900]
    assert retry_delay(50) == RETRY_MAX_DELAY
    # ... and every one has a key of its own.
    assert len(keys) == 9
    # The lake moved (a run committed): a new failure there is re-requested at once.
    moved = next_retry(state, {0: 60}, moment + timedelta(seconds=2))
    assert moved is not None and moved.attempt == 1 and moved.marks == "0:60"
