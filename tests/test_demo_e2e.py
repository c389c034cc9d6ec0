"""The demo command as a person runs it: real `dagster dev` (webserver, daemon, sensor,
queued runs in subprocesses) on Postgres storage, fed by the synthetic producer or by the
workload generator through the OLTP database and Debezium."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import polars as pl
import psycopg2
import pytest
from deltalake import DeltaTable

from billing_dagster.aggregates import refresh_aggregates
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.local_infra.process import free_port, port_open
from billing_dagster.projection import decided_marks

PARTITIONS = 24  # the demo's topic
SUCCESSFUL_RUNS = """
query { runsOrError(filter: {statuses: [SUCCESS]}) {
  ... on Runs { results { runId jobName } } } }
"""


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def successful_ingest_runs(port: int, job: str = "ingest_billing_events") -> int:
    try:
        runs = graphql(port, SUCCESSFUL_RUNS)["data"]["runsOrError"]["results"]
    except (OSError, KeyError, TypeError):
        return 0
    return sum(1 for run in runs if run["jobName"] == job)


def raw_rows(lake: Path) -> int:
    try:
        return pl.read_delta(str(lake / "raw")).height
    except Exception:  # not created yet
        return 0


def serving_url_of(demo_output: str) -> str | None:
    match = re.search(r"balances in (postgresql://\S+)", demo_output)
    return None if match is None else match.group(1)


def serving_has_balances(demo_output: str) -> bool:
    url = serving_url_of(demo_output)
    if url is None:
        return False
    try:
        with closing(psycopg2.connect(url)) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM customer_balances")
            return cursor.fetchone()[0] > 0
    except psycopg2.Error:
        return False


@dataclass(frozen=True)
class Drained:
    """Postgres and the lake's billing_events at one moment when Postgres held exactly the
    offsets the lake had decided (every partition's serving mark at the decided mark)."""

    marks: dict[int, int]
    balances: dict[int, Decimal]  # customer_balances
    history_rows: int
    history_usd: Decimal
    events: pl.DataFrame  # billing_events at the lake version the marks were read from


def serving_snapshot(
    url: str, topic: str
) -> tuple[dict[int, int], dict[int, Decimal], int, Decimal]:
    """Marks, balances and history of the serving database, all from one snapshot."""
    with (
        closing(psycopg2.connect(url)) as connection,
        connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cursor.execute(
            "SELECT kafka_partition, next_offset FROM balance_offsets WHERE topic = %s", (topic,)
        )
        marks = dict(cursor.fetchall())
        cursor.execute("SELECT customer_id, current_balance FROM customer_balances")
        balances = dict(cursor.fetchall())
        cursor.execute("SELECT count(*), coalesce(sum(amount_usd), 0) FROM transaction_history")
        history_rows, history_usd = cursor.fetchone()
    return marks, balances, history_rows, history_usd


def drained(url: str, lake: Path, topic: str, timeout_s: float = 120) -> Drained:
    """Wait (the producer keeps going) for a moment when Postgres holds every offset the
    lake decided and nothing else, and read both stores as of that moment."""
    deadline = time.monotonic() + timeout_s
    last: tuple[dict, dict] = ({}, {})
    while time.monotonic() < deadline:
        # The lake first, pinned to one version per table; then Postgres in one snapshot.
        # Equal marks mean both hold exactly the same offsets, whichever moved in between.
        events_table = DeltaTable(str(lake / BILLING_EVENTS_TABLE))
        raw_table = DeltaTable(str(lake / RAW_TABLE))
        decided = decided_marks(
            LakeLocation(str(lake)),
            topic,
            range(PARTITIONS),
            events_table=events_table,
            raw_table=raw_table,
        )
        marks, balances, history_rows, history_usd = serving_snapshot(url, topic)
        lake_marks = {p: m for p, m in decided.items() if m}
        serving = {p: m for p, m in marks.items() if m}
        if lake_marks and lake_marks == serving:
            return Drained(
                serving, balances, history_rows, history_usd, pl.read_delta(events_table)
            )
        last = (lake_marks, serving)
        time.sleep(0.5)
    pytest.fail(f"Postgres never caught up with the lake in {timeout_s}s: lake, serving = {last}")


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("broker", "source"),
    [
        ("tansu", "synthetic"),  # the default: ./dev/demo.sh
        ("kafka", "cdc"),  # workload -> OLTP Postgres -> Debezium -> Apache Kafka
    ],
)
def test_demo_runs_the_pipeline_in_the_ui_and_stops_cleanly(
    tmp_path: Path, broker: str, source: str
):
    port = free_port()
    state = tmp_path / "demo"
    log = tmp_path / "demo.log"
    started = time.monotonic()
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "billing_dagster.cli",
            "demo",
            "--port",
            str(port),
            "--broker",
            broker,
            "--source",
            source,
            "--state-dir",
            str(state),
            "--rate",
            "300",
            "--for-seconds",
            "600",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        # Generous: on a shared, loaded machine Kafka Connect and each run take minutes. With
        # the wait for Postgres below it stays well inside the demo's --for-seconds 600.
        deadline = started + 360
        while time.monotonic() < deadline:
            if demo.poll() is not None:
                pytest.fail(f"demo exited early:\n{log.read_text()[-3000:]}")
            if (
                successful_ingest_runs(port) >= 2
                and raw_rows(state / "lake") > 0
                and serving_has_balances(log.read_text())
            ):
                break
            time.sleep(2)
        else:
            pytest.fail(f"no successful ingest run in time:\n{log.read_text()[-3000:]}")
        print(f"{broker}: first rows in the lake {time.monotonic() - started:.0f}s after start")
        assert port_open(port)
        # Balances are served from the demo's Postgres and are exactly the lake's accepted
        # events, compared at a moment Postgres has applied every offset the lake decided.
        output = log.read_text()
        topic = re.search(r"into '([^']+)' \(24 partitions\)", output).group(1)
        state_now = drained(serving_url_of(output), state / "lake", topic)
        events = state_now.events
        assert events.height > 0 and events["amount_usd"].null_count() == 0
        assert state_now.history_rows == events.height
        assert state_now.history_usd == events["amount_usd"].sum()
        assert sum(state_now.balances.values()) == events["amount_usd"].sum()
        lake_balances = dict(
            events.group_by("customer_id").agg(pl.col("amount_usd").sum()).iter_rows()
        )
        assert state_now.balances == lake_balances
        # And the lake's rows are exactly the offsets the marks cover, each once.
        assert events.select("kafka_partition", "kafka_offset").n_unique() == events.height
        beyond = events.filter(
            pl.col("kafka_offset")
            >= pl.col("kafka_partition").replace_strict(state_now.marks, default=0)
        )
        assert beyond.is_empty()
        # The revenue aggregates come from their own runs (the revenue refresh sensor's),
        # off the ingest runs.
        deadline = time.monotonic() + 240
        while successful_ingest_runs(port, "refresh_revenue") < 1:
            assert time.monotonic() < deadline, f"no refresh run:\n{log.read_text()[-3000:]}"
            time.sleep(2)
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=90)

    output = log.read_text()
    broker_port = int(re.search(r"broker on 127\.0\.0\.1:(\d+)", output).group(1))
    postgres_port = int(re.search(r"postgresql://\S+@127\.0\.0\.1:(\d+)/", output).group(1))
    time.sleep(1)
    servers = [("UI", port), ("broker", broker_port), ("Postgres", postgres_port)]
    if source == "cdc":
        connect_port = re.search(r"connector status: http://127\.0\.0\.1:(\d+)/", output)
        servers.append(("Kafka Connect", int(connect_port.group(1))))
    for name, server_port in servers:
        assert not port_open(server_port), f"{name} still listening after the demo stopped"
    raw = pl.read_delta(str(state / "lake" / "raw"))
    assert raw.select("kafka_partition", "kafka_offset").n_unique() == raw.height
    # The demo's events are enriched and accepted, not quarantined for lack of reference data.
    events = pl.read_delta(str(state / "lake" / "billing_events"))
    assert events.height > 0
    assert events["amount_usd"].null_count() == 0
    assert events["event_id"].n_unique() == events.height
    if source == "cdc":  # only inserts of the money tables reach the billing topic
        # (ingest creates the table empty before its first commit: nothing may be in it)
        quarantine = state / "lake" / QUARANTINE_TABLE
        assert not quarantine.exists() or pl.read_delta(str(quarantine)).is_empty()
    # The refresh runs built the revenue aggregates; after catching up with what the stop
    # left unrefreshed, they hold exactly the accepted events' money.
    daily_path = state / "lake" / "aggregated" / "daily_revenue"
    assert pl.read_delta(str(daily_path)).height > 0
    refresh_aggregates(LakeLocation(str(state / "lake")))
    daily = pl.read_delta(str(daily_path))
    assert daily["net_revenue_usd"].sum() == events["amount_usd"].sum()
    assert daily["transaction_count"].sum() == events.height
