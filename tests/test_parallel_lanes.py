"""Lanes ingest in parallel, exactly once: the lane plan (pure), lanes racing their
commits on a local lake and on S3 (moto), and one event delivered on two lanes at once.

Each racer is a process of its own (as a run on its own worker is), against real Kafka,
Delta tables and Postgres; the end state is compared with an independent recomputation.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from datetime import UTC, datetime

import polars as pl
import psycopg2
import pytest
from confluent_kafka import Producer

from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.lanes import busy_lanes, lane_of, lane_tag, plan_lanes
from billing_dagster.synthetic import GeneratedRecord

from .conftest import Pipeline
from .test_crashes import _ingest, _produce, _stream, assert_exactly_once

LANES = 3
NOW = datetime(2026, 12, 2, 10, 30, tzinfo=UTC)


# ---- the plan (pure) --------------------------------------------------------------------


def test_partitions_go_to_lanes_modulo_and_a_run_of_another_layout_holds_every_lane():
    assert [lane_of(p, 3) for p in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert busy_lanes([lane_tag(1, 3)], 3) == {1}
    assert busy_lanes([lane_tag(0, 3), lane_tag(2, 3)], 3) == {0, 2}
    # A UI Materialize of a whole hour (no tag), a replay ("all"), a run of 2 lanes.
    assert busy_lanes([None], 3) == {0, 1, 2}
    assert busy_lanes(["all"], 3) == {0, 1, 2}
    assert busy_lanes([lane_tag(1, 2)], 3) == {0, 1, 2}


def test_a_busy_lane_waits_while_the_others_are_planned():
    ends = {p: 100 for p in range(6)}
    plans = plan_lanes(
        "t",
        lanes=LANES,
        busy={1},
        cursor={p: 40 for p in range(6)},
        lows=dict.fromkeys(range(6), 0),
        ends=ends,
        committed={p: 40 for p in range(6)},
        start_from="earliest",
        now=NOW,
        offset_lookup=lambda _moment: dict.fromkeys(range(6), 0),
        max_records_per_run=1_000,
    )
    by_lane = {plan.lane: plan.plan for plan in plans}
    assert by_lane[1].batches == ()
    for lane in (0, 2):
        (batch,) = by_lane[lane].batches
        assert {r.partition for r in batch.ranges} == {lane, lane + 3}
        assert all((r.start, r.end) == (40, 100) for r in batch.ranges)
    # The busy lane's requested offsets stay where they were; the others move to the end.
    cursor = {p: o for plan in plans for p, o in plan.plan.cursor.items()}
    assert cursor == {0: 100, 1: 40, 2: 100, 3: 100, 4: 40, 5: 100}


# ---- lanes racing -----------------------------------------------------------------------


def _lane_ranges(ranges: list[tuple[int, int, int]], lane: int) -> list[tuple[int, int, int]]:
    return [r for r in ranges if lane_of(r[0], LANES) == lane]


def _lane_racer(env, ranges, barrier, errors) -> None:
    """One lane's batch: decide, wait for the other lanes, then commit at the same time."""

    def on_step(step: str) -> None:
        if step == "decided":
            barrier.wait(timeout=120)

    try:
        _ingest(env, ranges, on_step)
    except Exception as exc:  # reported to the test, which fails on it
        errors.put(f"{type(exc).__name__}: {exc}")


def _race(env: dict[str, str], ranges: list[tuple[int, int, int]]) -> list[str]:
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(LANES), context.Queue()
    racers = [
        context.Process(target=_lane_racer, args=(env, _lane_ranges(ranges, lane), barrier, errors))
        for lane in range(LANES)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=240)
        assert racer.exitcode == 0, "a lane's process died or hung"
    found = []
    while not errors.empty():
        found.append(errors.get())
    return found


@pytest.mark.parametrize("store", ["local", "s3"])
def test_lanes_committing_at_the_same_moment_land_every_event_once(
    store: str, request: pytest.FixtureRequest
):
    """Three lanes decide their partitions' batches, then all commit billing_events,
    Postgres, quarantine and raw/ at once, twice: Delta appends from several writers
    (rename on a local disk, conditional put on S3) and Postgres' per-partition marks
    keep every event exactly once."""
    pipeline: Pipeline = request.getfixturevalue("pipeline" if store == "local" else "s3_pipeline")
    stream = _stream(seed=83)
    produced: list[GeneratedRecord] = []
    for _round in range(2):
        records = list(stream.records(900))
        produced += records
        ranges = _produce(pipeline, records)
        assert len({lane_of(p, LANES) for p, _, _ in ranges}) == LANES
        assert _race(pipeline.env, ranges) == []
    assert_exactly_once(pipeline, produced)


# ---- one event on two lanes -------------------------------------------------------------


def _produce_to(pipeline: Pipeline, partition: int, values: list[bytes]) -> tuple[int, int, int]:
    with pipeline.client() as client:
        start = client.end_offsets(pipeline.settings.topic).get(partition, 0)
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka_bootstrap_servers})
    for value in values:
        producer.produce(pipeline.settings.topic, value=value, key=b"1001", partition=partition)
    producer.flush(30)
    return partition, start, start + len(values)


def _held_at_staged(env, ranges, staged, release, errors) -> None:
    """Lane A: stages its Postgres transaction (its rows inserted, uncommitted), then waits."""

    def on_step(step: str) -> None:
        if step == "staged":
            staged.set()
            release.wait(timeout=120)

    try:
        _ingest(env, ranges, on_step)
    except Exception as exc:
        errors.put(f"lane A {type(exc).__name__}: {exc}")


def _free(env, ranges, errors, reports) -> None:
    try:
        report = _ingest(env, ranges)
        reports.put((report.accepted, report.duplicates, report.quarantined))
    except Exception as exc:
        errors.put(f"lane B {type(exc).__name__}: {exc}")


def _waiting_on_a_lock(url: str) -> bool:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO transaction_history%%'"
        )
        return cursor.fetchone()[0] > 0


CREATED_AT = datetime.now(UTC).replace(microsecond=0).isoformat()


def _event(event_id: str, amount: str) -> bytes:
    return json.dumps(
        {
            "event_id": event_id,
            "customer_id": 1001,
            "amount": amount,
            "currency": "USD",
            "transaction_type": "PAYMENT",
            "created_at": CREATED_AT,
        }
    ).encode()


def test_an_event_accepted_on_two_lanes_at_once_counts_once(pipeline: Pipeline):
    """The same customer's events on partitions of two lanes (after a repartition): lane B
    decides while lane A holds the same event_ids staged but not committed, so neither the
    lake nor Postgres told B about them. Postgres' key makes B wait for A, then B's copy
    becomes a duplicate (same content) or a conflict in quarantine (different content)."""
    same, differing = str(uuid.uuid4()), str(uuid.uuid4())
    a_values = [_event(same, "10.00"), _event(differing, "20.00")]
    b_values = [a_values[0], _event(differing, "25.00")]
    lane_a = _produce_to(pipeline, 0, a_values)
    lane_b = _produce_to(pipeline, 1, b_values)
    context = multiprocessing.get_context("spawn")
    staged, release = context.Event(), context.Event()
    errors, reports = context.Queue(), context.Queue()
    a = context.Process(
        target=_held_at_staged, args=(pipeline.env, [lane_a], staged, release, errors)
    )
    a.start()
    assert staged.wait(timeout=120), "lane A never staged"
    b = context.Process(target=_free, args=(pipeline.env, [lane_b], errors, reports))
    b.start()
    url = pipeline.settings.postgres_url
    deadline = time.monotonic() + 120
    while not _waiting_on_a_lock(url):
        assert time.monotonic() < deadline, "lane B never reached lane A's rows"
        assert b.exitcode is None, "lane B finished without waiting for lane A"
        time.sleep(0.2)
    release.set()
    for process in (a, b):
        process.join(timeout=120)
        assert process.exitcode == 0
    assert errors.empty(), errors.get()
    assert reports.get(timeout=5) == (0, 1, 1)
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    assert sorted(events["kafka_partition"].to_list()) == [0, 0]
    quarantine = read_table(pipeline.lake, QUARANTINE_TABLE)
    (conflict,) = quarantine.filter(pl.col("kafka_partition") == 1).iter_rows(named=True)
    assert conflict["rules"] == ["duplicate:conflict"]
    assert "partition 0" in conflict["reason"]
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_balance::text FROM customer_balances WHERE customer_id = 1001"
        )
        assert cursor.fetchone() == ("30.00",)
        cursor.execute("SELECT count(*) FROM transaction_history")
        assert cursor.fetchone() == (2,)
