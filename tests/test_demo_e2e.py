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
from decimal import Decimal
from pathlib import Path

import polars as pl
import psycopg2
import pytest

from billing_dagster.aggregates import refresh_aggregates
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.local_infra.process import free_port, port_open

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


def successful_ingest_runs(port: int) -> int:
    try:
        runs = graphql(port, SUCCESSFUL_RUNS)["data"]["runsOrError"]["results"]
    except (OSError, KeyError, TypeError):
        return 0
    return sum(1 for run in runs if run["jobName"] == "ingest_billing_events")


def raw_rows(lake: Path) -> int:
    try:
        return pl.read_delta(str(lake / "raw")).height
    except Exception:  # not created yet
        return 0


def serving_totals(demo_output: str) -> tuple[int, Decimal, Decimal] | None:
    """(customers, sum of balances, sum of the ledger) from the demo's serving database."""
    match = re.search(r"balances in (postgresql://\S+)", demo_output)
    if match is None:
        return None
    with psycopg2.connect(match.group(1)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT count(*) FROM customer_balances), "
            "(SELECT coalesce(sum(current_balance), 0) FROM customer_balances), "
            "(SELECT coalesce(sum(amount_usd_total), 0) FROM balance_batches)"
        )
        customers, balance_total, ledger_total = cursor.fetchone()
    return (customers, balance_total, ledger_total) if customers else None


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
        deadline = started + 150
        while time.monotonic() < deadline:
            if demo.poll() is not None:
                pytest.fail(f"demo exited early:\n{log.read_text()[-3000:]}")
            if (
                successful_ingest_runs(port) >= 2
                and raw_rows(state / "lake") > 0
                and (balances := serving_totals(log.read_text())) is not None
            ):
                break
            time.sleep(2)
        else:
            pytest.fail(f"no successful ingest run in time:\n{log.read_text()[-3000:]}")
        print(f"{broker}: first rows in the lake {time.monotonic() - started:.0f}s after start")
        assert port_open(port)
        # Balances are served from the demo's Postgres and agree with the batch ledger.
        customers, balance_total, ledger_total = balances
        assert customers > 0
        assert balance_total == ledger_total
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
        assert not (state / "lake" / "quarantine").exists()
    # The ingest runs refreshed the revenue aggregates; after catching up a run the stop
    # may have cut short, they hold exactly the accepted events' money.
    daily_path = state / "lake" / "aggregated" / "daily_revenue"
    assert pl.read_delta(str(daily_path)).height > 0
    refresh_aggregates(LakeLocation(str(state / "lake")))
    daily = pl.read_delta(str(daily_path))
    assert daily["net_revenue_usd"].sum() == events["amount_usd"].sum()
    assert daily["transaction_count"].sum() == events.height
