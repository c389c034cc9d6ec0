"""Operating the pipeline from the command line, as an operator would: `status`, and
`replay` launched as a Dagster backfill into a real instance (Postgres storage) that a real
`dagster-daemon` serves, with the live sensor running beside it, against real Kafka."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.local_infra.dagster import dagster_daemon
from billing_dagster.local_infra.process import REPO_ROOT
from billing_dagster.offsets import hour_start
from billing_dagster.serving import connect, read_balances
from billing_dagster.synthetic import SyntheticBillingStream

from .conftest import Pipeline, pipeline_env
from .test_settings_and_cli import run_cli

AGGREGATES = (
    "aggregated/hourly_revenue",
    "aggregated/daily_revenue",
    "aggregated/customer_metrics",
)


@pytest.fixture
def operated(kafka, topic, lake_root, serving_url, postgres, tmp_path) -> Iterator[Pipeline]:
    """The pipeline's environment with a Dagster home on Postgres and a running daemon."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dev" / "dagster.yaml", home / "dagster.yaml")
    env = pipeline_env(
        kafka,
        topic,
        lake_root,
        serving_url,
        DAGSTER_HOME=str(home),
        DAGSTER_POSTGRES_URL=postgres.create_database(f"dagster_{topic[-8:]}"),
        BILLING_SENSOR_INTERVAL_SECONDS="2",
    )
    pipeline = Pipeline(env)
    # The daemon alone runs what matters here: the sensor, the run queue and backfills.
    log = tmp_path / "dagster.log"
    try:
        with dagster_daemon(env, log):
            yield pipeline
    finally:
        print(log.read_text()[-3000:])


def cli(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, **pipeline.env)


def wait_until_caught_up(pipeline: Pipeline, timeout_s: float = 180) -> dict:
    """`status --json` until the lake has processed every offset (lag 0) and no ingest run
    is queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = cli(pipeline, "status", "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        if (
            status["lag"] == 0
            and all(p["processed"] is not None for p in status["partitions"])
            and status["ingest_runs_in_progress"] == 0
        ):
            return status
        assert time.monotonic() < deadline, f"still lagging: {status['lag']}"
        time.sleep(2)


def snapshot(pipeline: Pipeline) -> dict[str, pl.DataFrame]:
    """Every table a replay could touch, in a comparable order."""
    tables = {
        name: read_table(pipeline.lake, name)
        for name in (RAW_TABLE, BILLING_EVENTS_TABLE, QUARANTINE_TABLE, *AGGREGATES)
        if pipeline.lake.open(name) is not None
    }
    frames = {name: frame.sort(frame.columns[:6]) for name, frame in tables.items()}
    frames["customer_balances"] = read_balances(pipeline.settings.postgres_url).drop("last_updated")
    with connect(pipeline.settings.postgres_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT event_id, amount::text FROM transaction_history ORDER BY 1")
        frames["transaction_history"] = pl.DataFrame(
            cursor.fetchall(), schema=["event_id", "amount"], orient="row"
        )
    return frames


def assert_same(before: dict[str, pl.DataFrame], after: dict[str, pl.DataFrame]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].equals(after[name]), f"{name} changed"


def replay(pipeline: Pipeline, start: datetime, end: datetime) -> dict:
    """`replay --wait`: the daemon's backfill loop ticks every 30 s, so this takes a while."""
    result = run_cli(
        "replay",
        "--from",
        start.isoformat(),
        "--to",
        end.isoformat(),
        "--wait",
        "--timeout",
        "300",
        "--json",
        timeout_s=360,
        **pipeline.env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


# Two backfills at the daemon's fixed 30 s cadence: ~4 min here, more on a loaded machine.
@pytest.mark.timeout(900)
def test_replaying_processed_ranges_changes_nothing_even_beside_the_live_sensor(
    operated: Pipeline,
):
    pipeline = operated
    # The range spans a schema change: v1 events (no tax_amount field), then v2 events.
    pipeline.produce(list(SyntheticBillingStream(seed=21, v1_rate=1.0).records(150)))
    pipeline.produce(list(SyntheticBillingStream(seed=22, v1_rate=0.0).records(150)))
    status = wait_until_caught_up(pipeline)
    assert status["last_run"]["status"] == "SUCCESS"
    assert status["last_run"]["kind"] == "kafka"  # launched by the live sensor
    text = cli(pipeline, "status")
    assert text.returncode == 0, text.stderr
    assert f"topic {pipeline.settings.topic}: total lag 0 records" in text.stdout
    assert "last ingest run: SUCCESS" in text.stdout
    assert "last reconciliation: none" in text.stdout
    before = snapshot(pipeline)
    assert before[BILLING_EVENTS_TABLE]["tax_amount"].null_count() > 0  # v1 events are there
    assert (
        before[BILLING_EVENTS_TABLE]["tax_amount"].null_count()
        < before[BILLING_EVENTS_TABLE].height
    )

    now = datetime.now(UTC)
    start, end = hour_start(now) - timedelta(hours=1), now + timedelta(minutes=1)
    dry = cli(
        pipeline,
        "replay",
        "--from",
        start.isoformat(),
        "--to",
        end.isoformat(),
        "--dry-run",
        "--json",
    )
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert (
        plan["records"] == plan["already_processed"] == sum(p["end"] for p in status["partitions"])
    )
    assert plan["to_process"] == 0

    first = replay(pipeline, start, end)
    assert first["status"] == "COMPLETED_SUCCESS" and first["failed_runs"] == 0
    assert first["runs"] >= 2  # the log hour's ingest run, then the aggregates
    assert_same(before, snapshot(pipeline))

    # Again over the same range, now racing the live sensor over new records: the old
    # offsets stay as they were and each new one is applied once, by whichever run is first.
    pipeline.produce(list(SyntheticBillingStream(seed=23).records(200)))
    raced = replay(pipeline, start, datetime.now(UTC) + timedelta(minutes=1))
    assert raced["status"] == "COMPLETED_SUCCESS"
    status = wait_until_caught_up(pipeline)
    after = snapshot(pipeline)
    old = before[RAW_TABLE].select("kafka_partition", "kafka_offset", "event_id")
    assert old.join(after[RAW_TABLE], on=["kafka_partition", "kafka_offset"], how="anti").is_empty()
    # Every offset is in raw/ (decoded) or only in quarantine/ (undecodable), raw/ once.
    raw = read_table(pipeline.lake, RAW_TABLE)
    position = ["kafka_partition", "kafka_offset"]
    assert raw.select(position).n_unique() == raw.height
    seen = pl.concat(
        [raw.select(position), read_table(pipeline.lake, QUARANTINE_TABLE).select(position)]
    )
    assert seen.n_unique() == sum(p["end"] for p in status["partitions"])
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    assert events["event_id"].n_unique() == events.height
    balances = read_balances(pipeline.settings.postgres_url)
    expected = events.group_by("customer_id").agg(pl.col("amount_usd").sum())
    joined = balances.join(expected, on="customer_id", how="full", coalesce=True)
    assert (joined["current_balance"] == joined["amount_usd"]).all()
    with connect(pipeline.settings.postgres_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM transaction_history")
        assert cursor.fetchone()[0] == events.height


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["replay", "--from", "2024-12-15T12:00", "--to", "2024-12-15T10:00"],
            {},
            "must be before --to",
        ),
        (["replay", "--from", "yesterday", "--to", "2024-12-15"], {}, "--from must be a time"),
        (
            ["replay", "--from", "2024-12-15", "--to", "2024-12-16", "--topic", "nope"],
            {},
            "the pipeline reads",
        ),
        (["status"], {"BILLING_TOPIC": "no-such-topic"}, "topic 'no-such-topic' does not exist"),
        (
            ["status"],
            {
                "BILLING_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                "BILLING_KAFKA_TIMEOUT_SECONDS": "2",
            },
            "cannot reach Kafka",
        ),
    ],
)
def test_bad_arguments_give_one_line_and_a_non_zero_exit(pipeline, args, env, message):
    result = run_cli(*args, **{**pipeline.env, **env})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_replay_without_a_dagster_home_says_so(pipeline):
    pipeline.produce(list(SyntheticBillingStream(seed=5).records(20)))
    status = run_cli("status", **{**pipeline.env, "DAGSTER_HOME": ""})
    assert status.returncode == 0, status.stderr
    assert "total lag 20 records" in status.stdout
    assert "last ingest run: none (DAGSTER_HOME not set)" in status.stdout
    now = datetime.now(UTC)
    result = run_cli(
        "replay",
        "--from",
        (now - timedelta(hours=1)).isoformat(),
        "--to",
        now.isoformat(),
        **{**pipeline.env, "DAGSTER_HOME": ""},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: DAGSTER_HOME is not set")
    assert "20 records, 0 already in the lake" in result.stdout


@pytest.fixture
def dagster_home(postgres, tmp_path) -> dict[str, str]:
    """A Dagster instance on Postgres, as dev/dagster.yaml configures it (no daemon)."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dev" / "dagster.yaml", home / "dagster.yaml")
    url = postgres.create_database(f"dagster_{tmp_path.name[-12:].lower().replace('-', '_')}")
    return {"DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_URL": url}


def test_backfill_command_registers_a_backfill_the_ui_shows(pipeline, dagster_home):
    import dagster as dg

    env = {**pipeline.env, **dagster_home}
    result = run_cli(
        "backfill",
        "--asset",
        "daily_reconciliation",
        "--partitions",
        "2024-03-01...2024-03-05",
        "--json",
        **env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["partitions"] == [f"2024-03-0{d}" for d in range(1, 6)]

    os.environ.update(dagster_home)  # the same instance, read back as the UI would
    try:
        with dg.DagsterInstance.get() as instance:
            backfill = instance.get_backfill(report["backfill_id"])
            assert backfill.status.value == "REQUESTED"  # the daemon takes it from here
            assert backfill.tags["billing/ingest"] == "reconcile"
            targeted = backfill.asset_backfill_data.target_subset
            assert {
                (p.asset_key.to_user_string(), p.partition_key)
                for p in targeted.iterate_asset_partitions()
            } == {("daily_reconciliation", k) for k in report["partitions"]}
    finally:
        for name in dagster_home:
            os.environ.pop(name, None)

    # The ingest step's assets come together, whichever of them is named.
    hours = run_cli(
        "backfill", "--asset", "billing_events", "--partitions", "2024-03-01-10:00", "--json", **env
    )
    assert hours.returncode == 0, hours.stderr
    assert json.loads(hours.stdout)["assets"] == [
        "billing_events",
        "customer_balances",
        "raw_billing_events",
        "transaction_history",
    ]

    for args, message in (
        (["--asset", "hourly_revenue", "--partitions", "x"], "--asset must be a partitioned"),
        (["--asset", "daily_reconciliation", "--partitions", "2024-03-05...2024-03-01"], "after"),
        (["--asset", "daily_reconciliation", "--partitions", "1999-01-01"], "no partition"),
    ):
        bad = run_cli("backfill", *args, **env)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr
