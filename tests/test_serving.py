"""The Postgres serving layer against real Postgres and real Kafka: balances equal an
independent sum to the cent after duplicates, replays, concurrent runs and a Postgres
restart mid-batch."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import dagster as dg
import polars as pl
import psycopg2
import pytest

from billing_dagster.contract import BILLING_EVENTS_TABLE, RAW_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.kafka_io import KafkaClient
from billing_dagster.postgres_db import migrate, migration_files
from billing_dagster.projection import catch_up, committed_events, decided_marks
from billing_dagster.serving import ServingGapError, read_balances, serving_marks
from billing_dagster.serving_batch import apply_batch
from billing_dagster.synthetic import SyntheticBillingStream
from resources import KafkaResource

from .conftest import Pipeline, pipeline_env
from .lake_rows import (
    balances,
    balances_not_matching_history,
    expected_balances,
    history_counts,
)
from .test_ingest_kafka import evaluate_sensor, materialization, materialize, request_ranges


def test_migrations_are_ordered_and_rerunning_them_is_harmless(serving_url: str):
    names = [p.name for p in migration_files()]
    assert names == sorted(names) and names
    # Three starters at once: exactly one applies each file, none fails.
    with ThreadPoolExecutor(max_workers=3) as pool:
        applied = list(pool.map(lambda _: migrate(serving_url), range(3)))
    assert sorted(applied, key=len) == [[], [], names]
    assert migrate(serving_url) == []
    with psycopg2.connect(serving_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in cursor.fetchall()] == names


def test_balances_match_an_independent_sum_after_duplicates_and_replays(
    pipeline: Pipeline, tmp_path: Path
):
    instance = dg.DagsterInstance.ephemeral()
    stream = SyntheticBillingStream(seed=41, duplicate_rate=0.05, invalid_rate=0.01)
    first = list(stream.records(3_000))
    pipeline.produce(first)
    requests, cursor, _ = evaluate_sensor(pipeline, instance, None)
    for request in requests:
        assert materialize(pipeline, request, instance).success
    second = list(stream.records(2_000)) + [r for r in first if r.kind == "valid"][:200]
    pipeline.produce(second)
    later, _, _ = evaluate_sensor(pipeline, instance, cursor)
    for request in later:
        assert materialize(pipeline, request, instance).success
    url, topic = pipeline.settings.postgres_url, pipeline.settings.topic
    batches = requests + later
    accepted = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    expected = expected_balances(first + second, SyntheticBillingStream().reference_data())
    assert balances(url) == expected
    after_once = read_balances(url)
    marks_once = serving_marks(url, topic)

    # 1. The same runs again (a UI re-execution): the lake has every offset; nothing changes.
    for request in batches:
        result = materialize(pipeline, request, instance)
        assert result.success
        assert materialization(result, "customer_balances").metadata["events_applied"].value == 0

    # 2. The committed billing_events rows of every applied range, handed to apply_batch
    # again: balance_offsets is at or past each range's end, so every row is skipped.
    replayed_rows = 0
    for request in batches:
        ranges = request_ranges(request)
        rows = committed_events(pipeline.lake, topic, ranges)
        replay = apply_batch(url, rows, topic=topic, ranges=ranges, run_id="replay")
        assert (replay.events_applied, replay.history_inserted, replay.batch_id) == (0, 0, None)
        assert replay.events_already_applied == rows.height
        replayed_rows += rows.height
    assert replayed_rows == accepted.height  # the ranges cover every accepted row
    # All of it as one batch from offset 0 (a replay overlapping several applied batches).
    everything = {p: (0, end) for p, end in marks_once.items()}
    rows = committed_events(pipeline.lake, topic, everything)
    assert rows.height == accepted.height
    replay = apply_batch(url, rows, topic=topic, ranges=everything, run_id="replay-all")
    assert (replay.events_applied, replay.events_already_applied) == (0, accepted.height)

    # 3. The marks lost while history kept its rows: the catch-up re-applies every
    # billing_events row from offset 0, and history's keys stop each one from counting again.
    with psycopg2.connect(url) as connection, connection.cursor() as cur:
        cur.execute("UPDATE balance_offsets SET next_offset = 0 WHERE topic = %s", (topic,))
    connection.close()
    repair = catch_up(
        url,
        pipeline.lake,
        topic,
        decided_marks(pipeline.lake, topic, sorted(marks_once)),
        run_id="repair",
    )
    assert repair.applied == {p: (0, end) for p, end in marks_once.items() if end > 0}
    assert repair.events_applied == 0 and Decimal(repair.amount_usd_applied) == 0
    assert serving_marks(url, topic) == marks_once

    # 4. A rebuilt lake replaying every range from Kafka into the same serving database:
    # each record is read and decided again, and apply_batch finds its offsets applied.
    rebuilt = Pipeline({**pipeline.env, "BILLING_LAKE_ROOT": str(tmp_path / "rebuilt-lake")})
    read_again = 0
    for request in batches:
        result = materialize(rebuilt, request, instance)
        assert result.success
        read_again += materialization(result, "raw_billing_events").metadata["records_read"].value
        serving = materialization(result, "customer_balances").metadata
        decided = materialization(result, "billing_events").metadata["accepted"].value
        assert serving["events_applied"].value == 0
        assert serving["events_already_applied"].value == decided
    assert read_again == len(first) + len(second)
    position = ["event_id", "kafka_partition", "kafka_offset"]
    assert (
        read_table(rebuilt.lake, BILLING_EVENTS_TABLE)
        .select(position)
        .sort(position)
        .equals(accepted.select(position).sort(position))
    )

    # Through all of that: the balances are exactly what they were after the first pass,
    # versions and timestamps included, and equal the independent sum to the cent.
    assert read_balances(url).equals(after_once)
    assert balances(url) == expected
    # The balances are also exactly the lake's accepted events, summed.
    lake = accepted.group_by("customer_id").agg(pl.col("amount_usd").sum())
    assert balances(url) == dict(lake.iter_rows())
    assert balances_not_matching_history(url) == []
    # History holds each accepted event once.
    assert history_counts(url) == (accepted.height, accepted.height)
    with psycopg2.connect(url) as connection, connection.cursor() as cur:
        cur.execute(
            "SELECT kind, count(*), sum(events_applied) FROM balance_batches "
            "GROUP BY kind ORDER BY kind"
        )
        assert cur.fetchall() == [("batch", len(batches), accepted.height), ("repair", 1, 0)]
    connection.close()


def accepted_frame(
    customers: list[int], amount: str, partition: int, count: int, topic: str = "t"
) -> pl.DataFrame:
    """billing_events-like rows at offsets 0..count-1 of one partition of `topic`."""
    now = datetime.now(UTC)

    return pl.DataFrame(
        {
            "event_id": [str(uuid.uuid4()) for _ in range(count)],
            "customer_id": [customers[i % len(customers)] for i in range(count)],
            "transaction_type": ["PAYMENT"] * count,
            "amount": [Decimal(amount)] * count,
            "currency": ["USD"] * count,
            "amount_usd": [Decimal(amount)] * count,
            "created_at": [now] * count,
            "kafka_topic": [topic] * count,
            "kafka_partition": [partition] * count,
            "kafka_offset": list(range(count)),
        },
        schema_overrides={
            "amount": pl.Decimal(12, 2),
            "amount_usd": pl.Decimal(12, 2),
            "kafka_partition": pl.Int32,
            "created_at": pl.Datetime("us", "UTC"),
        },
    )


def test_concurrent_batches_on_the_same_customers_lose_no_update(serving_url: str):
    migrate(serving_url)
    customers = list(range(1, 21))
    batches = [accepted_frame(customers, "1.25", partition, 400) for partition in range(8)]
    errors: list[BaseException] = []

    def apply(frame: pl.DataFrame, partition: int) -> None:
        try:
            apply_batch(serving_url, frame, topic="t", ranges={partition: (0, 400)}, run_id="r")
        except BaseException as exc:
            errors.append(exc)

    # Eight runs on eight Kafka partitions at once, plus every one of them a second time
    # (a replay racing the original): each batch must land exactly once.
    threads = [
        threading.Thread(target=apply, args=(frame, p))
        for _ in range(2)
        for p, frame in enumerate(batches)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    frame = read_balances(serving_url)
    # 8 batches x 400 events x 1.25 over 20 customers: 200.00 each, never more, never less.
    assert frame["current_balance"].to_list() == [Decimal("200.00")] * 20
    assert frame["version"].to_list() == [8] * 20
    assert serving_marks(serving_url, "t") == dict.fromkeys(range(8), 400)
    assert balances_not_matching_history(serving_url) == []


def test_two_topics_feeding_the_same_customers_in_concurrent_runs(
    kafka, topic, lake_root, serving_url, tmp_path, monkeypatch
):
    from billing_dagster.kafka_io import ensure_topic

    other = f"{topic}-cdc"
    ensure_topic(kafka.bootstrap_servers, other, partitions=24)
    pipelines = [
        Pipeline(pipeline_env(kafka, name, lake_root, serving_url)) for name in (topic, other)
    ]
    streams = [
        SyntheticBillingStream(seed=s, customers=30, duplicate_rate=0.0, invalid_rate=0.0)
        for s in (51, 52)
    ]
    records = [list(s.records(1_500)) for s in streams]
    # Refunds are only generated after a payment in the same stream: keep only payments
    # and adjustments so each topic stands alone.
    records = [
        [r for r in rs if r.event.transaction_type.value in ("PAYMENT", "ADJUSTMENT")]
        for rs in records
    ]
    for p, rs in zip(pipelines, records, strict=True):
        p.produce(rs)

    # A Dagster instance on Postgres, configured by the project's own dagster.yaml.
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(Path("dev/dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", serving_url.rsplit("/", 1)[0] + "/dagster")
    instance = dg.DagsterInstance.from_config(str(home))
    requests = [evaluate_sensor(p, instance, None)[0][0] for p in pipelines]
    # Two runs at once, each in its own process as Dagster launches them (two in-process
    # runs in threads of one interpreter deadlock in logging.config, a harness artefact).
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
        futures = [
            pool.submit(run_in_own_process, p.env, str(home), request)
            for p, request in zip(pipelines, requests, strict=True)
        ]
        results = [f.result(timeout=240) for f in futures]
    assert all(success for success, _ in results), results
    reference = SyntheticBillingStream().reference_data()
    assert balances(serving_url) == expected_balances(records[0] + records[1], reference)
    # Both runs are in Dagster's Postgres run storage.
    assert {run_id for _, run_id in results} <= {
        rec.dagster_run.run_id for rec in instance.get_run_records()
    }
    instance.dispose()


def run_in_own_process(env: dict[str, str], home: str, request: dg.RunRequest):
    instance = dg.DagsterInstance.from_config(home)
    try:
        result = materialize(Pipeline(env, write_reference=False), request, instance)
        return result.success, result.run_id
    finally:
        instance.dispose()


class KillPostgresAfterRead(KafkaResource):
    """Reads the batch, then Postgres goes down; it comes back a few seconds later, as a
    restarting server would."""

    def client(self) -> KafkaClient:
        client = super().client()
        real_read = client.read

        def read_then_kill(topic, ranges):
            result = real_read(topic, ranges)
            if not RESTART["done"]:
                RESTART["done"] = True
                RESTART["server"].pause()
                threading.Timer(4.0, RESTART["server"].resume).start()
            return result

        client.read = read_then_kill
        return client


RESTART: dict[str, object] = {"done": False}


def test_postgres_restart_mid_batch_fails_clearly_and_the_retry_converges(
    pipeline: Pipeline, postgres
):
    instance = dg.DagsterInstance.ephemeral()
    records = list(SyntheticBillingStream(seed=61).records(1_000))
    pipeline.produce(records)
    (request,), _, _ = evaluate_sensor(pipeline, instance, None)
    RESTART.update(done=False, server=postgres)
    flaky = KillPostgresAfterRead(
        bootstrap_servers=pipeline.settings.kafka_bootstrap_servers,
        topic=pipeline.settings.topic,
        consumer_group=pipeline.settings.consumer_group,
    )
    try:
        result = materialize(
            pipeline, request, instance, resources={**pipeline.resources, "kafka": flaky}
        )
    finally:
        wait_until_reachable(pipeline.settings.postgres_url)
    assert result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries, "the first attempt should have failed while Postgres was down"
    failures = [str(e.event_specific_data.error) for e in retries]
    assert any(
        ("serving Postgres" in f and "BILLING_POSTGRES_URL" in f) or "failed mid-batch" in f
        for f in failures
    ), failures

    reference = SyntheticBillingStream().reference_data()
    assert balances(pipeline.settings.postgres_url) == expected_balances(records, reference)
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    assert events["event_id"].n_unique() == events.height
    assert read_table(pipeline.lake, RAW_TABLE).height == sum(
        1 for r in records if r.kind != "invalid"
    )


def test_postgres_crash_inside_the_balance_transaction_rolls_back_and_the_retry_converges(
    pipeline: Pipeline, postgres
):
    """The server dies while the batch's transaction has already inserted history and is
    waiting to upsert balances: nothing of it may survive, and the retry applies it once."""
    instance = dg.DagsterInstance.ephemeral()
    url = pipeline.settings.postgres_url
    streams = [SyntheticBillingStream(seed=s, customers=40) for s in (71, 72)]
    first, second = (list(s.records(600)) for s in streams)
    pipeline.produce(first)
    (request,), cursor, _ = evaluate_sensor(pipeline, instance, None)
    assert materialize(pipeline, request, instance).success
    pipeline.produce(second)
    (request,), _, _ = evaluate_sensor(pipeline, instance, cursor)

    # Hold every existing balance row, so the run's upsert waits inside its transaction.
    blocker = psycopg2.connect(url)
    blocker.cursor().execute("SELECT customer_id FROM customer_balances FOR UPDATE")
    crashed = threading.Event()

    def crash_while_the_upsert_waits() -> None:
        watch = psycopg2.connect(url)
        watch.autocommit = True
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with watch.cursor() as cursor:
                    cursor.execute(
                        # The balance upsert is one CTE with the history insert.
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE '%%INSERT INTO customer_balances%%' "
                        "AND pid <> pg_backend_pid()"
                    )
                    waiting = cursor.fetchone()[0]
                if waiting:
                    break
                time.sleep(0.05)
            else:
                blocker.close()  # let the run finish; the assertion below reports it
                return
        finally:
            watch.close()
        # History rows are in (uncommitted) at this point: check, then crash.
        postgres.pause()
        crashed.set()
        threading.Timer(4.0, postgres.resume).start()

    watcher = threading.Thread(target=crash_while_the_upsert_waits)
    watcher.start()
    try:
        result = materialize(pipeline, request, instance)
    finally:
        watcher.join()
        blocker.close()
        wait_until_reachable(url)
    assert crashed.is_set(), "the run never waited on the balance upsert"
    assert result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries, "the attempt inside the crashed transaction should have failed"

    reference = SyntheticBillingStream().reference_data()
    assert balances(url) == expected_balances(first + second, reference)
    accepted = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*), count(DISTINCT event_id) FROM transaction_history")
        assert cursor.fetchone() == (accepted.height, accepted.height)
        cursor.execute("SELECT sum(events_applied) FROM balance_batches")
        assert cursor.fetchone()[0] == accepted.height


def wait_until_reachable(url: str, timeout_s: float = 30) -> None:
    """After a crash test: give the restarting server time, so later tests find it up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            psycopg2.connect(url, connect_timeout=2).close()
            return
        except psycopg2.OperationalError:
            time.sleep(0.5)


def test_postgres_down_for_good_fails_with_one_clear_reason(pipeline: Pipeline):
    from billing_dagster.local_infra.process import free_port

    env = {
        **pipeline.env,
        "BILLING_POSTGRES_URL": f"postgresql://billing@127.0.0.1:{free_port()}/billing",
    }
    down = Pipeline(env)
    down.produce(list(SyntheticBillingStream(seed=62).records(50)))
    instance = dg.DagsterInstance.ephemeral()
    (request,), _, _ = evaluate_sensor(down, instance, None)
    result = materialize(down, request, instance)
    assert not result.success
    error = str(result.get_step_failure_events()[0].event_specific_data.error)
    assert "cannot reach the serving Postgres" in error and "BILLING_POSTGRES_URL" in error


def test_history_partitions_are_created_for_each_month_before_rows_arrive(serving_url: str):
    migrate(serving_url)
    frame = accepted_frame([7], "3.00", 0, 4).with_columns(
        created_at=pl.Series(
            [
                datetime(2026, 10, 31, 23, 59, tzinfo=UTC),
                datetime(2026, 11, 1, tzinfo=UTC),
                datetime(2026, 12, 15, tzinfo=UTC),
                datetime(2027, 1, 1, tzinfo=UTC),
            ],
            dtype=pl.Datetime("us", "UTC"),
        )
    )
    result = apply_batch(serving_url, frame, topic="t", ranges={0: (0, 4)}, run_id="r")
    assert sorted(result.partitions_created) == [
        "transaction_history_202610",
        "transaction_history_202611",
        "transaction_history_202612",
        "transaction_history_202701",
    ]
    with psycopg2.connect(serving_url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT tableoid::regclass::text, count(*) FROM transaction_history "
            "GROUP BY 1 ORDER BY 1"
        )
        assert cursor.fetchall() == [
            ("transaction_history_202610", 1),
            ("transaction_history_202611", 1),
            ("transaction_history_202612", 1),
            ("transaction_history_202701", 1),
        ]
    assert balances(serving_url) == {7: Decimal("12.00")}

    # The same events under another source (another topic's offsets): history already
    # holds them, inserts nothing, and the balance must not move (it used to double).
    other = frame.with_columns(kafka_topic=pl.lit("other"))
    again = apply_batch(serving_url, other, topic="other", ranges={0: (0, 4)}, run_id="r2")
    assert (again.history_inserted, again.events_applied, again.customers_updated) == (0, 0, 0)
    assert again.partitions_created == () and Decimal(again.amount_usd_applied) == 0
    assert again.applied == {0: (0, 4)}  # the offsets are applied all the same
    assert serving_marks(serving_url, "other") == {0: 4}
    assert read_balances(serving_url).select(
        "customer_id", "current_balance", "version"
    ).rows() == [(7, Decimal("12.00"), 1)]
    assert balances_not_matching_history(serving_url) == []

    # A batch mixing one of those events with a new one adds exactly the new one's amount.
    mixed = pl.concat(
        [
            other.slice(0, 1).with_columns(kafka_offset=pl.lit(4, pl.Int64)),
            accepted_frame([7], "3.00", 0, 1, topic="other").with_columns(
                created_at=pl.lit(datetime(2026, 12, 20, tzinfo=UTC), pl.Datetime("us", "UTC")),
                kafka_offset=pl.lit(5, pl.Int64),
            ),
        ]
    )
    third = apply_batch(serving_url, mixed, topic="other", ranges={0: (4, 6)}, run_id="r3")
    assert (third.history_inserted, third.events_applied) == (1, 1)
    assert third.events_already_applied == 1 and Decimal(third.amount_usd_applied) == 3
    assert balances(serving_url) == {7: Decimal("15.00")}
    assert balances_not_matching_history(serving_url) == []
    assert history_counts(serving_url) == (5, 5)

    # A batch that would leave offsets 6-7 unapplied is refused, and changes nothing.
    with pytest.raises(ServingGapError, match="other are behind this batch: offsets 0:6-8"):
        apply_batch(serving_url, mixed, topic="other", ranges={0: (8, 9)}, run_id="r4")
    assert serving_marks(serving_url, "other") == {0: 6}
    assert balances(serving_url) == {7: Decimal("15.00")}


def test_migrate_command_applies_once_and_names_an_unreachable_database(serving_url: str):
    from billing_dagster.local_infra.process import free_port

    from .test_settings_and_cli import run_cli

    first = run_cli("migrate", BILLING_POSTGRES_URL=serving_url)
    assert first.returncode == 0, first.stderr
    names = ", ".join(p.name for p in migration_files())
    assert names.startswith("0001_serving_tables.sql, 0002_history_positions_and_repairs.sql")
    assert first.stdout.strip() == f"applied {names}"
    again = run_cli("migrate", BILLING_POSTGRES_URL=serving_url)
    assert again.stdout.strip() == "nothing to apply: schema is current"

    down = run_cli(
        "migrate", BILLING_POSTGRES_URL=f"postgresql://billing@127.0.0.1:{free_port()}/billing"
    )
    assert down.returncode == 2
    (line,) = down.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the serving Postgres at") and (
        "BILLING_POSTGRES_URL" in line
    )
    wrong = run_cli("migrate", BILLING_POSTGRES_URL="mysql://db/billing")
    assert wrong.returncode == 2 and "BILLING_POSTGRES_URL" in wrong.stderr
