"""Operating the pipeline from the command line, as an operator would: `status`, and
`replay` launched as a Dagster backfill into a real instance (Postgres storage) that a real
`dagster-daemon` serves, with the live sensor running beside it, against real Kafka."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest
from dagster import DagsterEventType

from assets.ingest import RAW_BILLING_EVENTS
from billing_dagster.contract import (
    BILLING_EVENTS_TABLE,
    FX_RATES_TABLE,
    QUARANTINE_SCHEMA,
    QUARANTINE_TABLE,
    RAW_TABLE,
)
from billing_dagster.definitions import INGEST_CONCURRENCY_TAG
from billing_dagster.delta_lake import read_table
from billing_dagster.enrichment import usd_amount_of
from billing_dagster.local_infra.dagster import dagster_daemon
from billing_dagster.local_infra.process import REPO_ROOT
from billing_dagster.offsets import hour_start, ranges_from_text
from billing_dagster.postgres_db import connect
from billing_dagster.producer import make_producer, produce_records
from billing_dagster.revenue_refresh import REFRESH_KIND
from billing_dagster.serving import read_balances
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream

from .conftest import Pipeline, operated_env
from .test_settings_and_cli import run_cli

AGGREGATES = (
    "aggregated/hourly_revenue",
    "aggregated/daily_revenue",
    "aggregated/customer_metrics",
)


@pytest.fixture
def operated(kafka, topic, lake_root, serving_url, postgres, tmp_path) -> Iterator[Pipeline]:
    """The pipeline's environment with a Dagster home on Postgres and a running daemon."""
    env = operated_env(kafka, topic, lake_root, serving_url, postgres, tmp_path / "dagster_home")
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


def wait_until_caught_up(pipeline: Pipeline, timeout_s: float = 180, revenue: bool = False) -> dict:
    """`status --json` until the lake has processed every offset (lag 0) and no ingest run
    is queued or running; with `revenue`, also until the daemon's revenue refresh runs
    brought the aggregates up to billing_events and none is queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = cli(pipeline, "status", "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        aggregates = status["revenue"]
        if (
            status["lag"] == 0
            and all(p["processed"] is not None for p in status["partitions"])
            and status["ingest_runs_in_progress"] == 0
            and (
                not revenue
                or (
                    aggregates["aggregates_version"] == aggregates["billing_events_version"]
                    and aggregates["refresh_runs_in_progress"] == 0
                )
            )
        ):
            return status
        assert time.monotonic() < deadline, (
            f"still lagging: {status['lag']}; revenue: {status['revenue']}"
        )
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


def replay(pipeline: Pipeline, start: datetime, end: datetime, timeout_s: int = 600) -> dict:
    """`replay --wait`: the daemon's backfill loop ticks every 30 s, and a backfill's runs
    (each step in its own process) queue behind the sensor's, so this takes a while."""
    result = run_cli(
        "replay",
        "--from",
        start.isoformat(),
        "--to",
        end.isoformat(),
        "--wait",
        "--timeout",
        str(timeout_s),
        "--json",
        timeout_s=timeout_s + 60,
        **pipeline.env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def replay_ingest_metadata(instance: dg.DagsterInstance, backfill_id: str) -> list[dict]:
    """The raw_billing_events metadata of each ingest run of a replay's backfill."""
    found = []
    for run in instance.get_runs(dg.RunsFilter.for_backfill(backfill_id)):
        records = instance.get_records_for_run(
            run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
        ).records
        for record in records:
            materialization = record.event_log_entry.asset_materialization
            if materialization.asset_key == RAW_BILLING_EVENTS:
                metadata = {k: v.value for k, v in materialization.metadata.items()}
                found.append({"run_id": run.run_id, **metadata})
    return found


def positions(frame: pl.DataFrame) -> set[tuple[int, int]]:
    return set(frame.select("kafka_partition", "kafka_offset").iter_rows())


def expected_balances(
    records: list[GeneratedRecord], fx_rates: pl.DataFrame
) -> tuple[set[str], dict[int, Decimal]]:
    """Computed from what was produced: the valid events (each event_id once) and, per
    customer, their amounts in USD with the FX rates the test loaded, summed in Decimal."""
    rates = {(r["rate_date"], r["currency"]): r["usd_rate"] for r in fx_rates.iter_rows(named=True)}
    events = {r.event.event_id: r.event for r in records if r.event is not None}
    totals: dict[int, Decimal] = defaultdict(lambda: Decimal("0.00"))
    for event in events.values():
        rate = (
            Decimal(1)
            if event.currency == "USD"
            else rates[(event.created_at.astimezone(UTC).date(), event.currency)]
        )
        totals[event.customer_id] += usd_amount_of(event.amount, rate)
    return set(events), dict(totals)


class Feed:
    """New records the whole time it runs, a few every fraction of a second, as live
    traffic keeps arriving while an operator replays."""

    def __init__(self, pipeline: Pipeline, stream: SyntheticBillingStream) -> None:
        self.pipeline, self.stream = pipeline, stream
        self.produced: list[GeneratedRecord] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        producer = make_producer(self.pipeline.settings.kafka_bootstrap_servers)
        while not self.stop.is_set():
            chunk = list(self.stream.records(10))
            produce_records(producer, self.pipeline.settings.topic, chunk)
            self.produced.extend(chunk)
            time.sleep(0.3)

    def __enter__(self) -> Feed:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=90)
        assert not self.thread.is_alive()


# Two backfills at the daemon's fixed 30 s cadence: ~6 min here, far more on a loaded machine.
@pytest.mark.timeout(2400)
def test_replaying_processed_ranges_changes_nothing_even_beside_the_live_sensor(
    operated: Pipeline, monkeypatch
):
    pipeline = operated
    # The range spans a schema change: v1 events (no tax_amount field), then v2 events.
    produced = list(SyntheticBillingStream(seed=21, v1_rate=1.0).records(150))
    produced += list(SyntheticBillingStream(seed=22, v1_rate=0.0).records(150))
    pipeline.produce(produced)
    # The aggregates are in the snapshot: refreshed by the daemon's refresh run after the
    # ingest runs (its first run process imports Great Expectations: give it time).
    status = wait_until_caught_up(pipeline, timeout_s=600, revenue=True)
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

    # The daemon's runs, as the UI shows them (the same Postgres run storage).
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", pipeline.env["DAGSTER_POSTGRES_URL"])
    instance = dg.DagsterInstance.from_config(pipeline.env["DAGSTER_HOME"])
    try:
        first = replay(pipeline, start, end)
        assert first["status"] == "COMPLETED_SUCCESS" and first["failed_runs"] == 0
        assert first["runs"] >= 1  # the log hour's ingest run (refresh_revenue follows)
        assert_same(before, snapshot(pipeline))
        # It covered every processed range (one per partition and log hour of the Kafka
        # timestamps) and found each committed: no record was read again.
        old = pl.concat(
            [
                before[name].select("kafka_partition", "kafka_timestamp")
                for name in (RAW_TABLE, QUARANTINE_TABLE)
                if name in before
            ]
        )
        hour_ranges = old.select(
            "kafka_partition", pl.col("kafka_timestamp").dt.truncate("1h")
        ).n_unique()
        reads = replay_ingest_metadata(instance, first["backfill_id"])
        assert reads and sum(m["records_read"] for m in reads) == 0
        assert sum(m["requested_ranges_already_committed"] for m in reads) == hour_ranges
        assert all(m["offset_ranges_read"] == "" for m in reads)

        # Again over the same range while new records keep arriving and the live sensor
        # ingests them. The run queue holds one run of the ingest lane at a time
        # (billing/ingest, limit 1, dev/dagster.yaml), so the replay's run and the sensor's
        # never execute together; but the replay's run starts between sensor runs and
        # its log hour then reaches offsets the sensor has not taken yet, or has requested
        # in a run still queued. Each of those is applied once, by whichever run is first;
        # the processed ones are neither read again nor changed.
        processed = positions(before[RAW_TABLE]) | positions(
            before.get(QUARANTINE_TABLE, before[RAW_TABLE].clear())
        )
        old_marks = {p: max(o for q, o in processed if q == p) + 1 for p, _ in processed}
        with Feed(pipeline, SyntheticBillingStream(seed=23)) as feed:
            time.sleep(3)  # the live sensor is already ingesting when the replay starts
            raced = replay(pipeline, start, datetime.now(UTC) + timedelta(minutes=1))
        produced += feed.produced
        assert raced["status"] == "COMPLETED_SUCCESS" and raced["failed_runs"] == 0
        assert raced["already_processed"] >= len(processed)
        status = wait_until_caught_up(pipeline, timeout_s=600)
        assert sum(p["end"] for p in status["partitions"]) == len(produced)

        raced_reads = replay_ingest_metadata(instance, raced["backfill_id"])
        assert raced_reads
        # The replay took new records (in flight for the sensor) ...
        assert sum(m["records_read"] for m in raced_reads) > 0
        # ... and none it had processed before: every range it read starts past them.
        read = [r for m in raced_reads for r in ranges_from_text(m["offset_ranges_read"])]
        assert read
        assert all(r.start >= old_marks.get(r.partition, 0) for r in read)
        replay_runs = {m["run_id"] for m in raced_reads}

        # No two runs of the ingest lane overlapped (why this is no race in execution).
        # (Finished runs: `status` does not count queued ones, which may start any moment.)
        # Revenue refreshes are not the lane's: they run beside it.
        lane = [
            r
            for r in instance.get_run_records()
            if r.dagster_run.tags.get(INGEST_CONCURRENCY_TAG, REFRESH_KIND) != REFRESH_KIND
            and r.dagster_run.is_finished
            and r.start_time is not None
        ]
        assert replay_runs <= {r.dagster_run.run_id for r in lane}
        assert len(lane) >= 4 and all(r.end_time for r in lane)
        lane.sort(key=lambda r: r.start_time)
        for earlier, later in itertools.pairwise(lane):
            assert later.start_time >= earlier.end_time, (earlier.dagster_run.run_id, later)
    finally:
        instance.dispose()

    after = snapshot(pipeline)
    # What was processed before the replays is exactly as it was (the same rows, written
    # by the same runs at the same moments).
    for name in (RAW_TABLE, BILLING_EVENTS_TABLE, QUARANTINE_TABLE):
        if name in before:
            kept = before[name].join(
                after[name], on=before[name].columns, how="semi", nulls_equal=True
            )
            assert kept.height == before[name].height, f"{name}: processed rows changed"
    raw = read_table(pipeline.lake, RAW_TABLE)
    quarantine = (
        read_table(pipeline.lake, QUARANTINE_TABLE)
        if pipeline.lake.open(QUARANTINE_TABLE) is not None
        else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    )
    # The offsets the replay read are exactly the ones whose rows its run wrote.
    by_replay = pl.col("ingest_run_id").is_in(list(replay_runs))
    assert positions(raw.filter(by_replay)) | positions(quarantine.filter(by_replay)) == {
        (r.partition, o) for r in read for o in range(r.start, r.end)
    }
    # Every offset is in raw/ (decoded) or only in quarantine/ (undecodable), raw/ once.
    assert raw.select("kafka_partition", "kafka_offset").n_unique() == raw.height
    assert positions(raw) | positions(quarantine) == {
        (p["partition"], o) for p in status["partitions"] for o in range(p["end"])
    }
    assert raw.height == sum(1 for r in produced if r.kind != "invalid")
    # Each produced event is accepted exactly once, at one offset; nothing else is.
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    event_ids, balances = expected_balances(produced, read_table(pipeline.lake, FX_RATES_TABLE))
    assert events["event_id"].n_unique() == events.height == len(event_ids)
    assert set(events["event_id"]) == event_ids
    assert len(positions(events)) == events.height
    # Balances: recomputed from the produced records, to the cent.
    served = read_balances(pipeline.settings.postgres_url)
    assert dict(served.select("customer_id", "current_balance").iter_rows()) == balances
    with connect(pipeline.settings.postgres_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(*), count(DISTINCT event_id) FROM transaction_history")
        assert cursor.fetchone() == (events.height, events.height)


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
