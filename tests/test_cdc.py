"""Change data capture end to end: the workload generator writes the OLTP billing tables in
a real Postgres (wal_level=logical), Debezium in a real Kafka Connect worker captures them
into real Kafka, and the project's own ingest job takes them to the lake and the balances.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest

from billing_dagster.connector_probe import probe_connector
from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    FX_RATES_TABLE,
    QUARANTINE_TABLE,
    RAW_TABLE,
)
from billing_dagster.delta_lake import read_table
from billing_dagster.enrichment import usd_amount_of
from billing_dagster.kafka_io import KafkaClient, KafkaSettings
from billing_dagster.local_infra.debezium import CONNECTOR_NAME, LocalDebezium, reference_topic
from billing_dagster.oltp import connect_oltp, migrate_oltp, oltp_events_of_day, write_activities
from billing_dagster.oltp_reconciliation import reconcile_oltp_day
from billing_dagster.postgres_db import connect
from billing_dagster.serving import read_balances
from billing_dagster.workload import BillingWorkload, billing_events_of

from .conftest import Pipeline, pipeline_env
from .test_alerts_sensor import AlertsSensor
from .test_reconciliation import check_passed, run_ingest
from .test_settings_and_cli import run_cli

CUSTOMERS = 40  # few customers, so refunds, renewals and plan changes pile up on them
# Yesterday, so the day is a partition of the daily reconciliation (today's is not, yet).
YESTERDAY = datetime.now(UTC) - timedelta(days=1)


@pytest.fixture
def oltp_url(postgres) -> str:
    url = postgres.create_database(f"oltp_{uuid.uuid4().hex[:10]}")
    assert migrate_oltp(url) == ["0001_billing_schema.sql"]
    assert migrate_oltp(url) == []  # idempotent
    return url


@pytest.fixture
def cdc_pipeline(kafka, topic, lake_root, serving_url, oltp_url) -> Pipeline:
    return Pipeline(
        pipeline_env(
            kafka,
            topic,
            lake_root,
            serving_url,
            BILLING_TOPIC_FORMATS=f"{topic}=debezium-json",
            BILLING_OLTP_URL=oltp_url,
        )
    )


@pytest.fixture
def debezium(kafka, topic, oltp_url) -> Iterator[LocalDebezium]:
    server = LocalDebezium(kafka.bootstrap_servers, oltp_url, topic)
    yield server
    server.stop()


def write(url: str, activities) -> None:
    with connect_oltp(url) as connection:
        write_activities(connection, activities)


def oltp_events(url: str) -> pl.DataFrame:
    with connect_oltp(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT created_at::date FROM billing.payments UNION "
            "SELECT created_at::date FROM billing.refunds UNION "
            "SELECT created_at::date FROM billing.transactions"
        )
        days = sorted(row[0] for row in cursor.fetchall())
    return pl.concat([oltp_events_of_day(url, day) for day in days])


def ingest_until_caught_up(pipeline: Pipeline, instance, expected: int, timeout_s=90) -> None:
    """Sensor ticks and runs, as the daemon would, until the lake holds `expected` events."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run_ingest(pipeline, instance)
        table = pipeline.lake.open(BILLING_EVENTS_TABLE)
        if table is not None and table.count() >= expected:
            run_ingest(pipeline, instance)  # anything still in flight (duplicates) too
            return
        time.sleep(0.5)
    raise AssertionError(f"the lake did not reach {expected} events in {timeout_s}s")


def records_in(pipeline: Pipeline, topic: str) -> int:
    with pipeline.client() as client:
        return sum(client.end_offsets(topic).values())


def every_offset(pipeline: Pipeline, topic: str) -> pl.DataFrame:
    """(kafka_partition, kafka_offset) of every record of the topic (a new one: from 0)."""
    with pipeline.client() as client:
        ends = client.end_offsets(topic)
    return pl.DataFrame(
        [(p, o) for p, end in ends.items() for o in range(end)],
        schema={"kafka_partition": pl.Int32, "kafka_offset": pl.Int64},
        orient="row",
    )


def usd_of_rows(rows: pl.DataFrame, fx_rates: pl.DataFrame) -> dict[str, Decimal]:
    """Each OLTP money row's amount in USD, by event_id, computed here with Decimal from the
    rows and the FX reference the test loaded (rate of the event's UTC day; USD is 1)."""
    rates = {(r["rate_date"], r["currency"]): r["usd_rate"] for r in fx_rates.iter_rows(named=True)}
    return {
        row["event_id"]: usd_amount_of(
            row["amount"],
            Decimal(1)
            if row["currency"] == "USD"
            else rates[(row["created_at"].astimezone(UTC).date(), row["currency"])],
        )
        for row in rows.iter_rows(named=True)
    }


def expected_balances(rows: pl.DataFrame, fx_rates: pl.DataFrame) -> dict[int, Decimal]:
    """Per customer, the sum of its OLTP money rows in USD, each row once."""
    usd = usd_of_rows(rows, fx_rates)
    totals: dict[int, Decimal] = defaultdict(lambda: Decimal("0.00"))
    for event_id, customer_id in rows.select("event_id", "customer_id").iter_rows():
        totals[customer_id] += usd[event_id]
    return dict(totals)


def test_oltp_rows_reach_lake_and_balances_exactly_once_across_a_debezium_crash(
    cdc_pipeline: Pipeline, debezium: LocalDebezium, oltp_url: str, topic: str
):
    pipeline = cdc_pipeline
    workload = BillingWorkload(seed=11, customers=CUSTOMERS)
    batches = [list(workload.activities(n, now=YESTERDAY)) for n in (40, 120, 80, 80)]

    write(oltp_url, batches[0])  # before Debezium runs: taken by its initial snapshot
    debezium.start()
    write(oltp_url, batches[1])
    with dg.instance_for_test() as instance:
        before_crash = oltp_events(oltp_url)
        ingest_until_caught_up(pipeline, instance, before_crash.height)
        # Snapshot then streaming, no crash: each row is exactly one Kafka record and one
        # accepted event.
        assert records_in(pipeline, topic) == before_crash.height
        assert read_table(pipeline.lake, BILLING_EVENTS_TABLE).height == before_crash.height

        # A crash mid-stream: changes since the last offset flush are sent again after the
        # restart, and the rows committed while it is down must all still arrive.
        write(oltp_url, batches[2])
        debezium.kill()
        write(oltp_url, batches[3])
        assert probe_connector(debezium.status_url).state == "UNREACHABLE"
        debezium.start()
        source = oltp_events(oltp_url)
        ingest_until_caught_up(pipeline, instance, source.height)

        lake = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
        # Exactly once: every OLTP money row is one accepted event, nothing else is.
        assert lake.height == lake["event_id"].n_unique() == source.height
        assert sorted(lake["event_id"]) == sorted(source["event_id"])
        columns = ["event_id", "customer_id", "transaction_type", "amount", "currency"]
        assert lake.select(columns).sort("event_id").equals(source.select(columns).sort("event_id"))
        quarantine = pipeline.lake.open(QUARANTINE_TABLE)
        assert quarantine is None or read_table(pipeline.lake, QUARANTINE_TABLE).is_empty()
        # Every Kafka record (the rows, plus whatever Debezium sent again after the crash)
        # is in raw/ exactly once; its deliveries are of exactly the OLTP rows, and all the
        # redeliveries, and nothing else, were dropped as duplicates.
        raw = read_table(pipeline.lake, RAW_TABLE)
        position = ["kafka_partition", "kafka_offset"]
        assert raw.height == records_in(pipeline, topic) >= source.height
        assert (
            raw.select(position).sort(position).equals(every_offset(pipeline, topic).sort(position))
        )
        assert set(raw["event_id"]) == set(source["event_id"])
        assert lake.select(position).n_unique() == lake.height
        # Each customer's changes share one partition (PartitionRouting on customer_id).
        partitions = lake.group_by("customer_id").agg(pl.col("kafka_partition").n_unique())
        assert (partitions["kafka_partition"] == 1).all()
        assert lake["kafka_partition"].n_unique() > 5

        # The same activities sent straight to Kafka (no CDC) make the very same events.
        direct = pl.DataFrame(
            [json.loads(value) for _, value in billing_events_of(a for b in batches for a in b)]
        )
        assert sorted(direct["event_id"]) == sorted(source["event_id"])
        assert set(source["transaction_type"]) == {"PAYMENT", "REFUND", "CHARGEBACK", "ADJUSTMENT"}
        assert source["currency"].n_unique() >= 3

        # Balances: one row per customer, the USD sum of its OLTP rows recomputed here from
        # the rows and the loaded FX rates, to the cent; each row applied exactly once.
        fx_rates = read_table(pipeline.lake, FX_RATES_TABLE)
        balances = read_balances(pipeline.settings.postgres_url)
        assert dict(balances.select("customer_id", "current_balance").iter_rows()) == (
            expected_balances(source, fx_rates)
        )
        assert dict(lake.select("event_id", "amount_usd").iter_rows()) == usd_of_rows(
            source, fx_rates
        )
        with connect(pipeline.settings.postgres_url) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT event_id, amount_usd, kafka_partition, kafka_offset "
                "FROM transaction_history"
            )
            history = cursor.fetchall()
        # One history row per OLTP row, with its USD amount, at its lake row's offset.
        assert len(history) == source.height
        assert {e: usd for e, usd, _, _ in history} == usd_of_rows(source, fx_rates)
        assert sorted((e, p, o) for e, _, p, o in history) == sorted(
            lake.select("event_id", *position).iter_rows()
        )

        # Reconciliation against the OLTP source: zero discrepancy, every day.
        for day in sorted(set(source["created_at"].dt.date())):
            result = reconcile_oltp_day(pipeline.lake, oltp_url, day, tolerance_pct=Decimal("0.1"))
            assert result.status == "reconciled", result.metadata()
            assert result.metadata()["max_discrepancy_pct"] == "0.000000"
            run = pipeline.defs.resolve_job_def("reconcile_daily_revenue").execute_in_process(
                partition_key=day.isoformat(), instance=instance, raise_on_error=False
            )
            assert run.success
            assert check_passed(run, "matches_oltp")


def test_oltp_reconciliation_names_rows_the_lake_lacks_or_got_wrong(
    cdc_pipeline: Pipeline, debezium: LocalDebezium, oltp_url: str
):
    pipeline = cdc_pipeline
    workload = BillingWorkload(seed=5, customers=CUSTOMERS)
    debezium.start()
    write(oltp_url, list(workload.activities(60, now=YESTERDAY)))
    with dg.instance_for_test() as instance:
        ingest_until_caught_up(pipeline, instance, oltp_events(oltp_url).height)
        debezium.halt()
        # Written while CDC is stopped (missing in the lake), and a row changed behind the
        # pipeline's back (a billing row edited in place: amounts now differ).
        write(oltp_url, list(workload.activities(5, now=YESTERDAY)))
        with connect_oltp(oltp_url) as conn, conn, conn.cursor() as cursor:
            cursor.execute(
                "UPDATE billing.payments SET amount = amount + 1 WHERE payment_id = "
                "(SELECT payment_id FROM billing.payments ORDER BY created_at LIMIT 1) "
                "RETURNING payment_id::text"
            )
            (edited,) = cursor.fetchone()
        day = YESTERDAY.date()
        result = reconcile_oltp_day(pipeline.lake, oltp_url, day, tolerance_pct=Decimal("0.1"))
        kinds = dict(result.differences.select("event_id", "kind").iter_rows())
        assert kinds.pop(edited) == "amount_differs"
        assert set(kinds.values()) == {"missing_in_lake"} and kinds
        assert result.status != "reconciled"
        run = pipeline.defs.resolve_job_def("reconcile_daily_revenue").execute_in_process(
            partition_key=day.isoformat(), instance=instance, raise_on_error=False
        )
        assert not check_passed(run, "matches_oltp")


def test_connector_down_is_reported_by_the_alerts_sensor(
    kafka, topic, lake_root, serving_url, oltp_url, debezium: LocalDebezium, endpoint
):
    pipeline = Pipeline(
        pipeline_env(
            kafka,
            topic,
            lake_root,
            serving_url,
            BILLING_CDC_STATUS_URL=debezium.status_url,
            BILLING_ALERT_WEBHOOK_URL=f"{endpoint.url}/hooks",
        )
    )
    debezium.start()
    with dg.instance_for_test() as instance:
        sensor = AlertsSensor(pipeline, instance)
        sensor.tick()
        assert not [b for _, b, _ in endpoint.posts if b["alert"] == "cdc_connector_down"]

        # An operator pauses the connector: Kafka Connect reports PAUSED.
        pause = urllib.request.Request(
            f"{debezium.rest_url}/connectors/{CONNECTOR_NAME}/pause", method="PUT"
        )
        urllib.request.urlopen(pause, timeout=10).close()
        deadline = time.monotonic() + 30
        while probe_connector(debezium.status_url).state != "PAUSED":
            assert time.monotonic() < deadline, "the connector never reported PAUSED"
            time.sleep(0.3)
        sensor.tick()
        fired = [b for _, b, _ in endpoint.posts if b["alert"] == "cdc_connector_down"]
        assert [b["status"] for b in fired] == ["firing"]
        assert "PAUSED" in fired[0]["summary"]

        debezium.kill()  # and then the worker dies: still down, no second notification
        sensor.tick()
        assert len([b for _, b, _ in endpoint.posts if b["alert"] == "cdc_connector_down"]) == 1


def test_reference_tables_go_to_their_own_topics(
    kafka, topic, oltp_url, debezium: LocalDebezium, cdc_pipeline: Pipeline
):
    """Subscription and invoice changes (plan changes, invoices paid) are captured, but not
    into the billing topic, where they would only be quarantined."""
    debezium.start()
    activities = list(BillingWorkload(seed=3, customers=CUSTOMERS).activities(30))
    write(oltp_url, activities)
    expected = {
        topic: len(billing_events_of(activities)),
        **{
            reference_topic(oltp_url, table): sum(
                1 for a in activities for c in a.changes if c.table == table
            )
            for table in ("subscriptions", "invoices")
        },
    }
    settings = KafkaSettings(kafka.bootstrap_servers, consumer_group=f"g-{topic}")
    counts: dict[str, int] = {}
    deadline = time.monotonic() + 60
    with KafkaClient(settings) as client:
        while counts != expected and time.monotonic() < deadline:
            time.sleep(0.5)
            for name in expected:
                try:
                    counts[name] = sum(client.end_offsets(name).values())
                except Exception:  # created by Connect on its first change
                    counts[name] = 0
    assert counts == expected


def test_workload_cli_writes_oltp_or_kafka_and_refuses_a_missing_database(kafka, topic, oltp_url):
    env = {"BILLING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "BILLING_TOPIC": topic}
    to_oltp = run_cli(
        "workload", "--count", "25", "--rate", "500", **env, BILLING_OLTP_URL=oltp_url
    )
    assert to_oltp.returncode == 0, to_oltp.stderr
    assert "wrote 25 activities to the OLTP billing tables" in to_oltp.stdout
    assert oltp_events(oltp_url).height >= 20

    to_kafka = run_cli("workload", "--count", "25", "--rate", "500", "--json", **env)
    assert to_kafka.returncode == 0, to_kafka.stderr
    report = json.loads(to_kafka.stdout)
    assert (report["target"], report["activities"]) == (topic, 25)
    assert sum(report["by_kind"].values()) == 25
    settings = KafkaSettings(kafka.bootstrap_servers, consumer_group=f"g-{topic}")
    with KafkaClient(settings) as client:
        assert sum(client.end_offsets(topic).values()) >= 20

    no_oltp = run_cli("workload", "--count", "5", "--to", "oltp", **env)
    assert no_oltp.returncode == 2
    assert no_oltp.stderr.strip().splitlines() == [
        "error: --to oltp needs BILLING_OLTP_URL (the OLTP billing database)"
    ]
    unreachable = run_cli(
        "workload",
        "--count",
        "5",
        **env,
        BILLING_OLTP_URL="postgresql://billing@127.0.0.1:1/nowhere",
    )
    assert unreachable.returncode == 2
    assert "BILLING_OLTP_URL" in unreachable.stderr and "Traceback" not in unreachable.stderr


def start_cdc_cli(env: dict[str, str], state_dir) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "billing_dagster.cli", "cdc", "--state-dir", str(state_dir)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in process.stdout:
        if "connector status" in line:
            return process, line.rsplit(" ", 1)[-1].strip()
    raise AssertionError(f"cdc exited with {process.wait()} before the connector ran")


def stop_cli(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    rest = process.stdout.read()
    assert process.wait(timeout=60) == 0, rest
    return rest


def test_cdc_command_runs_debezium_until_stopped_and_resumes_from_its_offsets(
    kafka, topic, oltp_url, tmp_path
):
    env = {
        "BILLING_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "BILLING_TOPIC": topic,
        "BILLING_OLTP_URL": oltp_url,
    }
    config = run_cli("cdc", "--print-config", **env)
    assert json.loads(config.stdout)["snapshot.mode"] == "when_needed"
    refused = run_cli("cdc", **{**env, "BILLING_OLTP_URL": ""})
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: cdc needs BILLING_OLTP_URL (the OLTP billing database)"
    )

    workload = BillingWorkload(seed=8, customers=CUSTOMERS)
    settings = KafkaSettings(kafka.bootstrap_servers, consumer_group=f"g-{topic}")

    def wait_for(count: int) -> int:
        deadline = time.monotonic() + 60
        with KafkaClient(settings) as client:
            while (n := sum(client.end_offsets(topic).values())) < count:
                assert time.monotonic() < deadline, f"{n} of {count} changes in Kafka"
                time.sleep(0.3)
            return n

    first = list(workload.activities(20))
    write(oltp_url, first)
    process, status_url = start_cdc_cli(env, tmp_path / "cdc")
    assert probe_connector(status_url).state == "RUNNING"
    expected = len(billing_events_of(first))
    assert wait_for(expected) == expected  # the initial snapshot
    time.sleep(2)  # an offset flush (every second) after the snapshot
    assert "stopping Debezium" in stop_cli(process)
    assert probe_connector(status_url).state == "UNREACHABLE"

    second = list(workload.activities(20))
    write(oltp_url, second)  # committed while CDC is stopped
    process, _ = start_cdc_cli(env, tmp_path / "cdc")
    try:
        expected += len(billing_events_of(second))
        # Resumed from the stored offsets: the new rows, and no second snapshot.
        assert wait_for(expected) == expected
        time.sleep(2)
        assert wait_for(expected) == expected
    finally:
        stop_cli(process)
