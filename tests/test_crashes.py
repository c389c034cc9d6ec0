"""Exactly-once proved by killing, against real Kafka, Delta tables and Postgres.

Each test ends the same way: every Kafka offset is in raw/ once; every record is accepted,
a duplicate or quarantined, once; transaction_history holds exactly billing_events; and
every balance equals an independent recomputation from what was produced, to the cent.
The Postgres-facing tests run twice: against a durable server and against one with
`fsync`, `synchronous_commit` and `full_page_writes` off (the design keeps the money,
not the setting).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import uuid
from collections.abc import Iterator

import dagster as dg
import polars as pl
import psycopg2
import pytest
from deltalake.exceptions import CommitFailedError

from billing_dagster.batch_commit import COMMIT_STEPS
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.definitions import build_resources
from billing_dagster.delta_lake import read_table
from billing_dagster.enrichment import ReferenceData, write_reference_data
from billing_dagster.ingest import ingest_offsets
from billing_dagster.local_infra.kafka import ApacheKafka
from billing_dagster.local_infra.postgres import LocalPostgres
from billing_dagster.offsets import OffsetRange
from billing_dagster.projection import decided_marks
from billing_dagster.serving import serving_marks
from billing_dagster.settings import load_settings
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream

from .conftest import Pipeline, pipeline_env
from .lake_rows import balances as _balances
from .lake_rows import expected_balances
from .test_ingest_kafka import evaluate_sensor, materialize

#: Commits lost on a crash stay lost with synchronous_commit off: the WAL writer flushes
#: only every 10 s, so an immediate stop right after COMMIT drops it for sure.
NON_DURABLE_SETTINGS = {"wal_writer_delay": "10000ms"}


@pytest.fixture(scope="module", params=["durable", "non-durable"])
def crash_postgres(request) -> Iterator[LocalPostgres]:
    """A server of the test's own: these tests stop it, restore it, lose its commits."""
    durable = request.param == "durable"
    with LocalPostgres(
        database="crashes", durable=durable, settings={} if durable else NON_DURABLE_SETTINGS
    ) as server:
        yield server


@pytest.fixture
def crash_pipeline(
    kafka: ApacheKafka, topic: str, lake_root: str, crash_postgres: LocalPostgres
) -> Pipeline:
    url = crash_postgres.create_database(f"serving_{uuid.uuid4().hex[:10]}")
    return Pipeline(pipeline_env(kafka, topic, lake_root, url))


# ---- the run, in a process of its own --------------------------------------------------


def _run_batch(env: dict[str, str], ranges: list[tuple[int, int, int]], kill_at: str) -> None:
    """ingest_offsets as the run process does it; SIGKILL right after step `kill_at`."""

    def on_step(step: str) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    _ingest(env, ranges, on_step)


def _ingest(env: dict[str, str], ranges: list[tuple[int, int, int]], on_step=None):
    settings = load_settings(env)
    resources = build_resources(settings)
    lake = resources["lake"].location()
    kafka = resources["kafka"]
    resources["postgres"].ensure_migrated()
    cleaning = resources["billing_rules"].cleaning_context(lake, kafka.value_format(kafka.topic))
    with kafka.client() as client:
        return ingest_offsets(
            client,
            lake,
            kafka.topic,
            [OffsetRange(*r) for r in ranges],
            cleaning=cleaning,
            serving_url=resources["postgres"].url,
            run_id=f"run-{uuid.uuid4().hex[:8]}",
            on_step=on_step,
        )


def _racer(env, ranges, barrier, outcomes) -> None:
    """One of two writers: both decide the same offsets, then commit at the same moment.
    The loser retries, as the asset's retry policy does."""
    waited = False

    def on_step(step: str) -> None:
        nonlocal waited
        if step == "decided" and not waited:
            waited = True
            barrier.wait(timeout=60)

    try:
        _ingest(env, ranges, on_step)
        outcomes.put("committed")
    except CommitFailedError:
        # The asset's retry policy: up to 3 retries (the winner may still be committing).
        for attempt in range(3):
            try:
                _ingest(env, ranges)
                break
            except CommitFailedError:
                if attempt == 2:
                    raise
        outcomes.put("conflict, retried")


def _in_child(target, *args) -> int:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(timeout=180)
    assert process.exitcode is not None, "the batch process hung"
    return process.exitcode


# ---- producing and checking ------------------------------------------------------------


def _produce(pipeline: Pipeline, records: list[GeneratedRecord]) -> list[tuple[int, int, int]]:
    with pipeline.client() as client:
        before = client.end_offsets(pipeline.settings.topic)
        pipeline.produce(records)
        after = client.end_offsets(pipeline.settings.topic)
    return [
        (p, before.get(p, 0), end) for p, end in sorted(after.items()) if end > before.get(p, 0)
    ]


def _history(url: str) -> pl.DataFrame:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT event_id, kafka_partition, kafka_offset FROM transaction_history")
        return pl.DataFrame(
            cursor.fetchall(),
            schema={"event_id": pl.String, "kafka_partition": pl.Int32, "kafka_offset": pl.Int64},
            orient="row",
        )


def assert_exactly_once(pipeline: Pipeline, records: list[GeneratedRecord]) -> None:
    url = pipeline.settings.postgres_url
    topic = pipeline.settings.topic
    lake = pipeline.lake
    raw = read_table(lake, RAW_TABLE)
    events = read_table(lake, BILLING_EVENTS_TABLE)
    quarantine = read_table(lake, QUARANTINE_TABLE)
    # raw/: every delivery once (undecodable ones are in quarantine only).
    assert raw.select("kafka_partition", "kafka_offset").is_duplicated().sum() == 0
    assert quarantine.select("kafka_partition", "kafka_offset").is_duplicated().sum() == 0
    assert events["event_id"].is_duplicated().sum() == 0
    valid = {r.event.event_id for r in records if r.kind == "valid" and r.event}
    assert set(events["event_id"]) == valid
    positions = pl.concat(
        [
            events.select("kafka_partition", "kafka_offset"),
            quarantine.select("kafka_partition", "kafka_offset"),
        ]
    )
    assert positions.is_duplicated().sum() == 0, "an offset is both accepted and quarantined"
    invalid = sum(r.kind == "invalid" for r in records)
    assert quarantine.height == invalid
    # Postgres: exactly billing_events, and balances to the cent.
    history = _history(url)
    assert history.height == events.height
    assert history.sort("kafka_partition", "kafka_offset").equals(
        events.select("event_id", "kafka_partition", "kafka_offset").sort(
            "kafka_partition", "kafka_offset"
        )
    )
    expected = expected_balances(
        records,
        pipeline.resources["billing_rules"]
        .cleaning_context(lake, pipeline.resources["kafka"].value_format(topic))
        .reference,
    )
    balances = _balances(url)
    assert {c: b for c, b in balances.items() if b} == {c: t for c, t in expected.items() if t}
    assert set(balances) == set(expected)
    # Marks: after a drain, Postgres holds every offset the lake decided.
    partitions = list(range(24))
    lake_marks = {p: m for p, m in decided_marks(lake, topic, partitions).items() if m is not None}
    serving = serving_marks(url, topic)  # a partition without a mark is at 0
    assert {p: serving.get(p, 0) for p in lake_marks} == lake_marks


def _stream(seed: int) -> SyntheticBillingStream:
    return SyntheticBillingStream(seed=seed, duplicate_rate=0.05, invalid_rate=0.02)


# ---- the tests ------------------------------------------------------------------------


def test_sigkill_at_every_commit_window_loses_and_doubles_nothing(crash_pipeline: Pipeline):
    stream = _stream(seed=61)
    produced: list[GeneratedRecord] = []
    env = crash_pipeline.env
    for window in COMMIT_STEPS:
        records = list(stream.records(400))
        produced += records
        ranges = _produce(crash_pipeline, records)
        assert _in_child(_run_batch, env, ranges, window) == -signal.SIGKILL, window
        # The retry (the run's retry policy, or the sensor's re-request) takes it from there.
        report = _ingest(env, ranges)
        assert report.balanced
    # One more batch after the last crash, then everything adds up.
    records = list(stream.records(200))
    produced += records
    _ingest(env, _produce(crash_pipeline, records))
    assert_exactly_once(crash_pipeline, produced)


def test_postgres_stopped_right_after_a_balance_commit_loses_nothing(
    crash_pipeline: Pipeline, crash_postgres: LocalPostgres
):
    stream = _stream(seed=62)
    env = crash_pipeline.env
    produced = list(stream.records(500))
    _ingest(env, _produce(crash_pipeline, produced))

    batch = list(stream.records(500))
    produced += batch
    # Immediate stop (as a crash) the moment the balance transaction has committed; the
    # run goes on and commits raw/ and the consumer group, as the field failure did.
    report = _ingest(
        env, _produce(crash_pipeline, batch), on_step=_stop_at_postgres(crash_postgres)
    )
    assert report.serving is not None and report.serving.events_applied > 0
    crash_postgres.resume()
    url = crash_pipeline.settings.postgres_url
    behind = serving_marks(url, crash_pipeline.settings.topic)
    lake = decided_marks(crash_pipeline.lake, crash_pipeline.settings.topic, list(behind))
    lost = {p: (m, lake[p]) for p, m in behind.items() if lake[p] is not None and m < lake[p]}
    if not crash_postgres.durable:
        assert lost, "with synchronous_commit off the immediate stop should lose the commit"
    else:
        assert not lost

    # The next batch catches Postgres up from billing_events before its own.
    after = list(stream.records(300))
    produced += after
    report = _ingest(env, _produce(crash_pipeline, after))
    assert bool(report.serving_repair.applied) == bool(lost)
    assert_exactly_once(crash_pipeline, produced)


def test_postgres_losing_the_catch_up_before_the_dedupe_lookup_doubles_nothing(
    crash_pipeline: Pipeline, crash_postgres: LocalPostgres
):
    """Postgres is behind the lake (restored from before a batch). The next run catches
    it up from billing_events, then Postgres crashes and, without durable commits, comes
    back without that catch-up, just before the dedupe lookup reads transaction_history:
    redeliveries of events only the lost catch-up held must still be duplicates."""
    stream = _stream(seed=66)
    env = crash_pipeline.env
    url, topic = crash_pipeline.settings.postgres_url, crash_pipeline.settings.topic
    warm_up = list(stream.records(50))
    _ingest(env, _produce(crash_pipeline, warm_up))  # migrated, marks exist
    snapshot = crash_postgres.snapshot(f"catch-up-{uuid.uuid4().hex[:6]}")
    first = list(stream.records(300))
    _ingest(env, _produce(crash_pipeline, first))
    crash_postgres.restore(snapshot)  # Postgres no longer holds `first`; the lake does
    redelivered = [
        GeneratedRecord(r.key, r.value, "duplicate", r.event) for r in first if r.kind == "valid"
    ][:50]
    lost: list[bool] = []

    def lose_the_catch_up(step: str) -> None:
        if step == "caught_up" and not lost:
            crash_postgres.pause()  # immediate: the catch-up's commit may be in WAL buffers
            crash_postgres.resume()
            lake = decided_marks(crash_pipeline.lake, topic, list(range(24)))
            marks = serving_marks(url, topic)
            lost.append(any(m is not None and marks.get(p, 0) < m for p, m in lake.items()))

    report = _ingest(env, _produce(crash_pipeline, redelivered), on_step=lose_the_catch_up)
    if not crash_postgres.durable:
        assert lost == [True], "the immediate stop should lose the catch-up's commit"
    assert report.duplicates == len(redelivered) and report.accepted == 0
    assert_exactly_once(crash_pipeline, warm_up + first + redelivered)


def _stop_at_postgres(server: LocalPostgres):
    def on_step(step: str) -> None:
        if step == "postgres":
            server.pause()

    return on_step


def test_two_writers_racing_on_the_same_offsets_land_once(pipeline: Pipeline):
    """Lake commits racing: Postgres is not stopped, so the suite's server serves."""
    crash_pipeline = pipeline
    records = list(_stream(seed=63).records(600))
    ranges = _produce(crash_pipeline, records)
    context = multiprocessing.get_context("spawn")
    barrier, outcomes = context.Barrier(2), context.Queue()
    racers = [
        context.Process(target=_racer, args=(crash_pipeline.env, ranges, barrier, outcomes))
        for _ in range(2)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=180)
    assert [r.exitcode for r in racers] == [0, 0]
    # Both decided on the same snapshot; Delta's conflict check let exactly one commit land.
    assert sorted(outcomes.get(timeout=5) for _ in racers) == ["committed", "conflict, retried"]
    assert_exactly_once(crash_pipeline, records)


def test_serving_database_restored_from_an_earlier_snapshot_is_repaired_by_the_sensor(
    crash_pipeline: Pipeline, crash_postgres: LocalPostgres
):
    instance = dg.DagsterInstance.ephemeral()
    stream = _stream(seed=64)
    produced = list(stream.records(400))
    crash_pipeline.produce(produced)
    cursor = _drain(crash_pipeline, instance, None)
    snapshot = crash_postgres.snapshot(f"before-{uuid.uuid4().hex[:6]}")

    later = list(stream.records(400))
    produced += later
    crash_pipeline.produce(later)
    cursor = _drain(crash_pipeline, instance, cursor)
    assert_exactly_once(crash_pipeline, produced)

    crash_postgres.restore(snapshot)  # the lake moved on; Postgres is back in the past
    url, topic = crash_pipeline.settings.postgres_url, crash_pipeline.settings.topic
    assert serving_marks(url, topic) != {
        p: m
        for p, m in decided_marks(crash_pipeline.lake, topic, list(range(24))).items()
        if m is not None
    }
    requests, cursor, _ = evaluate_sensor(crash_pipeline, instance, cursor)
    (repair,) = requests
    assert repair.tags.get("billing/repair")
    result = materialize(crash_pipeline, repair, instance)
    assert result.success
    assert_exactly_once(crash_pipeline, produced)
    # The repair is in the ledger, named by its range, for the alert.
    with psycopg2.connect(url) as connection, connection.cursor() as db:
        db.execute(
            "SELECT events_applied, offset_ranges FROM balance_batches WHERE kind = 'repair'"
        )
        repairs = db.fetchall()
    assert sum(events for events, _ in repairs) > 0


def _drain(pipeline: Pipeline, instance: dg.DagsterInstance, cursor: str | None) -> str | None:
    for _ in range(5):
        requests, cursor, _ = evaluate_sensor(pipeline, instance, cursor)
        if not requests:
            return cursor
        for request in requests:
            assert materialize(pipeline, request, instance).success
    return cursor


def _without_rates(reference: ReferenceData) -> ReferenceData:
    return ReferenceData.of(
        reference.customers,
        reference.subscriptions,
        reference.fx_rates.filter(pl.col("currency") == "USD"),
    )


@pytest.mark.parametrize("first", ["rates present", "rates missing"])
def test_a_retry_keeps_the_decision_billing_events_committed(pipeline: Pipeline, first: str):
    """Reference data changes between a killed attempt and its retry (a `reference load`
    in between): the retry keeps what billing_events committed, so no event ends in the
    balances but in neither table, or in both."""
    crash_pipeline = pipeline
    full = _stream(seed=65).reference_data()
    before, after = (full, _without_rates(full))
    if first == "rates missing":
        before, after = after, before
    write_reference_data(crash_pipeline.lake, before)
    records = list(_stream(seed=65).records(500))
    ranges = _produce(crash_pipeline, records)
    # A batch 40 % short of rates is what the circuit breaker holds; here it is released
    # (as `billing-dagster release-batch` would), to show the retry keeps its decision.
    env = {**crash_pipeline.env, "BILLING_CIRCUIT_BREAKER_PERCENT": "100"}
    assert _in_child(_run_batch, env, ranges, "billing_events") == -signal.SIGKILL
    write_reference_data(crash_pipeline.lake, after)
    _ingest(env, ranges)

    lake, url = crash_pipeline.lake, crash_pipeline.settings.postgres_url
    events = read_table(lake, BILLING_EVENTS_TABLE)
    quarantine = read_table(lake, QUARANTINE_TABLE)
    raw = read_table(lake, RAW_TABLE)
    foreign = {
        r.event.event_id
        for r in records
        if r.kind == "valid" and r.event and r.event.currency != "USD"
    }
    assert foreign, "the stream should hold non-USD events"
    accepted = set(events["event_id"])
    if first == "rates present":
        assert foreign <= accepted  # decided with rates: stays accepted without them
    else:
        assert not foreign & accepted  # decided without: never accepted by the retry
        rejected = quarantine.filter(pl.col("rules").list.first() == "decision:rejected_earlier")
        # The non-USD events, and what failed with them the first time (a refund whose
        # original payment was one of them), all rejected now with the earlier decision.
        assert foreign <= {json.loads(v)["event_id"] for v in rejected["raw_value"]}
    # Every offset once, in exactly one of accepted / duplicate / quarantined.
    positions = ["kafka_partition", "kafka_offset"]
    both = events.select(positions).join(quarantine.select(positions), on=positions)
    assert both.is_empty()
    assert raw.select(positions).is_duplicated().sum() == 0
    duplicates = sum(r.kind == "duplicate" for r in records)
    assert events.height + quarantine.height + duplicates == len(records)
    # Postgres holds exactly billing_events, whatever the rules say now.
    assert _history(url).height == events.height
    per_customer = events.group_by("customer_id").agg(pl.col("amount_usd").sum())
    assert {c: t for c, t in per_customer.iter_rows() if t} == {
        c: b for c, b in _balances(url).items() if b
    }
