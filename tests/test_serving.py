"""The Postgres serving layer against real Postgres and real Kafka: balances equal an
independent sum to the cent after duplicates, replays, concurrent runs and a Postgres
restart mid-batch."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import dagster as dg
import polars as pl
import psycopg2

from billing_dagster.contract import BILLING_EVENTS_TABLE, RAW_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.enrichment import ReferenceData, usd_amount_of
from billing_dagster.kafka_io import KafkaClient
from billing_dagster.serving import (
    apply_batch,
    migrate,
    migration_files,
    read_balances,
)
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream
from resources import KafkaResource

from .conftest import Pipeline, pipeline_env
from .test_ingest_kafka import evaluate_sensor, materialization, materialize


def expected_balances(
    records: list[GeneratedRecord], reference: ReferenceData
) -> dict[int, Decimal]:
    """Balances computed independently: each valid event once, converted with Decimal."""
    rates = {
        (r["rate_date"], r["currency"]): r["usd_rate"]
        for r in reference.fx_rates.iter_rows(named=True)
    }
    events = {r.event.event_id: r.event for r in records if r.event is not None}
    totals: dict[int, Decimal] = defaultdict(lambda: Decimal("0.00"))
    for event in events.values():
        rate = (
            Decimal(1)
            if event.currency == "USD"
            else rates[(event.created_at.date(), event.currency)]
        )
        totals[event.customer_id] += usd_amount_of(event.amount, rate)
    return dict(totals)


def balances(url: str) -> dict[int, Decimal]:
    return dict(read_balances(url).select("customer_id", "current_balance").iter_rows())


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


def test_balances_match_an_independent_sum_after_duplicates_and_replays(pipeline: Pipeline):
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
    url = pipeline.settings.postgres_url
    after_once = read_balances(url)

    # Replays of every range, from the UI and from the sensor's requests: nothing changes.
    for request in requests + later:
        result = materialize(pipeline, request, instance)
        assert result.success
        assert materialization(result, "customer_balances").metadata["events_applied"].value == 0
    assert read_balances(url).equals(after_once)

    reference = SyntheticBillingStream().reference_data()
    assert balances(url) == expected_balances(first + second, reference)
    # The balances are also exactly the lake's accepted events, summed.
    lake = (
        read_table(pipeline.lake, BILLING_EVENTS_TABLE)
        .group_by("customer_id")
        .agg(pl.col("amount_usd").sum())
    )
    assert balances(url) == dict(lake.iter_rows())
    # History holds each accepted event once.
    with psycopg2.connect(url) as connection, connection.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT event_id) FROM transaction_history")
        accepted = read_table(pipeline.lake, BILLING_EVENTS_TABLE).height
        assert cur.fetchone() == (accepted, accepted)
        cur.execute("SELECT count(*) FROM balance_batches")
        assert cur.fetchone()[0] == len(requests) + len(later)


def accepted_frame(customers: list[int], amount: str, partition: int, count: int) -> pl.DataFrame:
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
            apply_batch(serving_url, frame, topic="t", processed_up_to={partition: 400}, run_id="r")
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
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'INSERT INTO customer_balances%%'"
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
    result = apply_batch(serving_url, frame, topic="t", processed_up_to={0: 4}, run_id="r")
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
    # The same events under another source (another topic's offsets) are still inserted
    # once: history is idempotent on transaction_id.
    again = apply_batch(serving_url, frame, topic="other", processed_up_to={0: 4}, run_id="r2")
    assert again.history_inserted == 0 and again.partitions_created == ()


def test_migrate_command_applies_once_and_names_an_unreachable_database(serving_url: str):
    from billing_dagster.local_infra.process import free_port

    from .test_settings_and_cli import run_cli

    first = run_cli("migrate", BILLING_POSTGRES_URL=serving_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "applied 0001_serving_tables.sql"
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
