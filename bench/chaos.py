"""Exactly-once under faults (issue 16): a black-box soak under the real daemon.

Starts the production set-up of bench/harness.py (Apache Kafka, Postgres for Dagster's
storage, a local lake, `dagster-daemon` on this workspace with the run queue of
dev/dagster.yaml) with the serving database on a Postgres of its own that is NOT durable
(`fsync`, `synchronous_commit` and `full_page_writes` off, the WAL writer flushing every
10 s), so an immediate stop really loses commits it has acknowledged. Then it produces
--events synthetic events (duplicate deliveries, malformed records) at --rate events/s,
keeping what it produced, and meanwhile injects --faults faults at random (seeded) times:

  postgres  immediate stop of the serving Postgres right after a balance commit (a new
            `balance_batches` row seen by polling), a couple of seconds down, restarted;
  worker    SIGKILL of the run worker process of an in-flight ingest run (the process the
            code server spawns for the run, found in the daemon's session);
  daemon    SIGKILL of dagster-daemon's whole process group (daemon, code server, run
            workers), then a new daemon started as the harness starts it.

When everything is drained (raw/ at Kafka's end offsets, `balance_offsets` at the lake's
decided marks, no ingest run queued or running) it compares, without the pipeline's code:
every balance against a Decimal recomputation from the produced records, to the cent;
transaction_history and billing_events against the distinct valid events; quarantine
against the malformed records; raw/ and quarantine against every Kafka offset. Exit
status 1 if anything is missing, doubled or wrong (the lake, logs, run event logs and
ledger are then kept under --evidence).

The Dagster instance is dev/dagster.yaml, with run monitoring (issue 17): a run stranded
by a daemon kill is failed after its maximum runtime. --run-monitoring overrides that
block with shorter limits (RUN_MONITORING below), so a soak drains sooner.

    .venv/bin/python bench/chaos.py --events 20000 --faults 4 --run-monitoring
    .venv/bin/python bench/chaos.py --events 100000 --faults 12 --run-monitoring
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import dagster as dg
import polars as pl
import psycopg2
from harness import PARTITIONS, Stack, end_offsets, lake_offsets, pipeline_stack
from machine_info import machine  # bench/ is the script folder, so on sys.path

from assets.ingest import INGEST_JOB
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import scan_table
from billing_dagster.enrichment import load_reference_data
from billing_dagster.local_infra.dagster import dagster_daemon
from billing_dagster.local_infra.postgres import LocalPostgres
from billing_dagster.local_infra.process import stop_on_sigterm
from billing_dagster.postgres_db import migrate
from billing_dagster.producer import make_producer, produce_at_rate
from billing_dagster.projection import decided_marks
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream
from sensors.kafka_offsets import REPAIR_TAG, WAITING_OR_RUNNING

#: As in tests/test_crashes.py: with synchronous_commit off the WAL writer flushes only
#: every 10 s, so an immediate stop right after COMMIT loses it.
NON_DURABLE_SETTINGS = {"wal_writer_delay": "10000ms"}
KINDS = ("postgres", "worker", "daemon")
CENT = Decimal("0.01")
#: --run-monitoring: shorter limits than dev/dagster.yaml's for runs whose worker died with
#: the daemon (the default run launcher cannot check a worker's health: only the start
#: timeout and the maximum runtime catch them).
RUN_MONITORING = """
run_monitoring:
  enabled: true
  start_timeout_seconds: 120
  max_runtime_seconds: 240
  poll_interval_seconds: 15
"""


class Log:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{datetime.now():%H:%M:%S} +{self.elapsed():7.1f} s] {message}", flush=True)


log = Log()


class RecordingStream(SyntheticBillingStream):
    """The synthetic stream, keeping every record it hands out (what was produced)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.produced: list[GeneratedRecord] = []

    def records(self, count: int, *, now: datetime | None = None) -> Iterator[GeneratedRecord]:
        for record in super().records(count, now=now):
            self.produced.append(record)
            yield record


# ---- processes of our daemon ------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    state: str
    cmdline: str


def processes_of_session(session: int) -> list[Proc]:
    """Every live process of a session (the daemon is started with start_new_session, so
    its code server and run workers are in its session unless they leave it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        proc = Proc(int(entry), int(fields[1]), int(fields[3]), fields[0], cmdline)
        if proc.session == session and proc.state != "Z":
            found.append(proc)
    return found


def run_workers(session: int) -> dict[int, str | None]:
    """Run worker processes -> their run id (None if not known yet). The code server
    (`dagster api grpc`) starts each run in a multiprocessing 'spawn' child
    (DefaultRunLauncher -> StartRun -> spawn_main); the worker's compute-log `tail`
    children name the run's folder, .../storage/<run id>/compute_logs/..."""
    procs = processes_of_session(session)
    servers = {p.pid for p in procs if "api grpc" in p.cmdline}
    workers: dict[int, str | None] = {
        p.pid: None for p in procs if "spawn_main" in p.cmdline and p.ppid in servers
    }
    for proc in procs:
        if proc.ppid in workers and "/compute_logs/" in proc.cmdline:
            workers[proc.ppid] = proc.cmdline.split("/compute_logs/")[0].rsplit("/", 1)[-1]
    return workers


class Daemon:
    """dagster-daemon, started as bench/harness.py's daemon() starts it (each start with
    its own log file, so a restart keeps the earlier log)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.starts = 0
        self.process = None
        self._context = None

    def start(self) -> None:
        self.starts += 1
        self._context = dagster_daemon(
            self.stack.env, self.stack.workdir / f"daemon-{self.starts}.log"
        )
        self.process = self._context.__enter__()
        log(f"dagster-daemon started (pid {self.process.pid}, daemon-{self.starts}.log)")

    def kill_group(self) -> int:
        """SIGKILL the daemon's process group at once; returns how many processes."""
        group = self.process.pid
        victims = processes_of_session(group)
        os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.stop()  # stop_process_group: waits until nothing of the group is left
        return len(victims)

    def stop(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


# ---- faults ------------------------------------------------------------------------------


@dataclass
class Faults:
    injected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    commits_lost: int = 0
    commits_survived: int = 0


def _serving_query(url: str, sql: str, args: tuple = ()) -> list[tuple]:
    with psycopg2.connect(url, connect_timeout=5) as connection, connection.cursor() as cursor:
        cursor.execute(sql, args)
        rows = cursor.fetchall()
    connection.close()
    return rows


class Patience:
    """How long a fault waits for its moment: until timeout_s, or as soon as the pipeline
    has nothing left to do (`idle()`: production over and everything drained)."""

    def __init__(self, timeout_s: float, idle: Callable[[], bool]) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.idle = idle
        self.checked = time.monotonic()
        self.reason = ""

    def over(self) -> bool:
        now = time.monotonic()
        if now > self.deadline:
            self.reason = "its moment did not come in time"
            return True
        if now - self.checked >= 5:
            self.checked = now
            try:
                idle = self.idle()
            except Exception:  # a store restarting: not idle
                idle = False
            if idle:
                self.reason = "the pipeline is idle (produced and drained)"
                return True
        return False


def _wait_for(predicate: Callable[[], object], patience: Patience, every_s: float) -> object:
    while not patience.over():
        try:
            value = predicate()
        except Exception:  # a store restarting
            value = None
        if value:
            return value
        time.sleep(every_s)
    return None


def stop_postgres_after_commit(
    serving: LocalPostgres, url: str, rng: random.Random, faults: Faults, patience: Patience
) -> bool:
    """Poll balance_batches for a new row with money in it; stop Postgres at once."""
    connection = psycopg2.connect(url, connect_timeout=5)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT coalesce(max(applied_at), '-infinity') FROM balance_batches")
            (since,) = cursor.fetchone()
            row = None
            while not patience.over():
                cursor.execute(
                    "SELECT batch_id, kind, events_applied, offset_ranges::text FROM "
                    "balance_batches WHERE applied_at > %s AND events_applied > 0 "
                    "ORDER BY applied_at DESC LIMIT 1",
                    (since,),
                )
                row = cursor.fetchone()
                if row is not None:
                    break
                time.sleep(0.02)
    finally:
        connection.close()
    if row is None:
        return False
    serving.pause()
    batch_id, kind, events, _ = row
    down = rng.uniform(1.5, 3.0)
    log(
        f"FAULT postgres: immediate stop right after the commit of {kind} {batch_id} "
        f"({events} events); down for {down:.1f} s"
    )
    time.sleep(down)
    serving.resume()
    survived = _serving_query(url, "SELECT 1 FROM balance_batches WHERE batch_id = %s", (batch_id,))
    if survived:
        faults.commits_survived += 1
        log(f"  postgres back; the commit of {batch_id} survived the stop")
    else:
        faults.commits_lost += 1
        log(f"  postgres back; the commit of {batch_id} was LOST ({events} events to repair)")
    return True


def _in_flight_ingest(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    return list(
        instance.get_run_records(
            dg.RunsFilter(job_name=INGEST_JOB, statuses=[dg.DagsterRunStatus.STARTED])
        )
    )


def _last_step(instance: dg.DagsterInstance, run_id: str) -> str:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
    return events[-1].step_key if events else "(before the first step)"


def kill_run_worker(
    instance: dg.DagsterInstance, daemon: Daemon, rng: random.Random, patience: Patience
) -> bool:
    """SIGKILL the worker process of a STARTED ingest run, a random moment into the run."""

    def target() -> tuple[dg.RunRecord, int] | None:
        workers = run_workers(daemon.process.pid)
        for record in _in_flight_ingest(instance):
            pids = [pid for pid, run in workers.items() if run == record.dagster_run.run_id]
            if pids:
                return record, pids[0]
        return None

    while True:
        found = _wait_for(target, patience, 0.2)
        if found is None:
            return False
        time.sleep(rng.uniform(0.0, 4.0))
        again = target()
        # Still the same run on the same worker (else it ended meanwhile: take the next).
        if again and (again[0].dagster_run.run_id, again[1]) == (
            found[0].dagster_run.run_id,
            found[1],
        ):
            break
    record, pid = found
    step = _last_step(instance, record.dagster_run.run_id)
    os.kill(pid, signal.SIGKILL)
    log(
        f"FAULT worker: SIGKILL of run worker pid {pid} of ingest run "
        f"{record.dagster_run.run_id[:8]} ({record.dagster_run.tags.get('billing/records')} "
        f"records; in step {step})"
    )
    return True


def _describe_runs(instance: dg.DagsterInstance) -> str:
    runs = instance.get_run_records(dg.RunsFilter(job_name=INGEST_JOB, statuses=WAITING_OR_RUNNING))
    return ", ".join(f"{r.dagster_run.run_id[:8]} {r.dagster_run.status.value}" for r in runs)


def kill_daemon(instance: dg.DagsterInstance, daemon: Daemon, rng: random.Random) -> bool:
    in_flight = _describe_runs(instance)
    count = daemon.kill_group()
    log(
        f"FAULT daemon: SIGKILL of dagster-daemon's process group ({count} processes; "
        f"ingest runs queued or in progress: {in_flight or 'none'})"
    )
    time.sleep(rng.uniform(1.0, 3.0))
    daemon.start()
    return True


def fault_plan(count: int, window_s: float, rng: random.Random) -> list[tuple[float, str]]:
    """`count` faults at random times over the production window, the kinds in turn
    (shuffled), so every kind is present from three faults on."""
    kinds = [KINDS[i % len(KINDS)] for i in range(count)]
    rng.shuffle(kinds)
    times = sorted(rng.uniform(min(10.0, window_s / 4), window_s) for _ in range(count))
    return list(zip(times, kinds, strict=True))


# ---- drain and comparison ----------------------------------------------------------------


def serving_marks(url: str, topic: str) -> dict[int, int]:
    rows = _serving_query(
        url, "SELECT kafka_partition, next_offset FROM balance_offsets WHERE topic = %s", (topic,)
    )
    return dict(rows)


def drain_state(stack: Stack, instance: dg.DagsterInstance, ends: dict[int, int]) -> list[str]:
    """What is not drained yet (empty: drained)."""
    partitions = list(range(PARTITIONS))
    waiting = []
    raw = lake_offsets(stack)
    behind = {p: (raw.get(p) or 0, end) for p, end in ends.items() if (raw.get(p) or 0) < end}
    if behind:
        waiting.append(f"raw/ behind Kafka on {len(behind)} partitions")
    decided = decided_marks(stack.lake, stack.topic, partitions)
    serving = serving_marks(stack.serving_url, stack.topic)
    gaps = {
        p: (serving.get(p, 0), m)
        for p, m in decided.items()
        if m is not None and serving.get(p, 0) != m
    }
    if gaps:
        waiting.append(
            "balance_offsets != decided marks at "
            + ", ".join(f"{p}:{s}->{m}" for p, (s, m) in sorted(gaps.items()))
        )
    runs = _describe_runs(instance)
    if runs:
        waiting.append(f"ingest runs queued or in progress: {runs}")
    return waiting


def stranded_runs(instance: dg.DagsterInstance) -> list[str]:
    """The in-flight ingest runs, with their last event: a run STARTING or STARTED whose
    worker is gone stays so for good unless run monitoring fails it."""
    lines = []
    for record in instance.get_run_records(
        dg.RunsFilter(job_name=INGEST_JOB, statuses=WAITING_OR_RUNNING)
    ):
        run = record.dagster_run
        events = instance.all_logs(run.run_id)
        last = events[-1] if events else None
        what = (
            f"last event {last.dagster_event_type.value if last.dagster_event_type else 'log'} "
            f"at {datetime.fromtimestamp(last.timestamp):%H:%M:%S}"
            if last
            else "no events"
        )
        tags = {k: v for k, v in run.tags.items() if k.startswith(("billing/", "dagster/retry"))}
        lines.append(f"  run {run.run_id} {run.status.value}: {what}; tags {tags}")
    return lines


def expected_balances(records: list[GeneratedRecord], fx: pl.DataFrame) -> dict[int, Decimal]:
    """Each valid event_id once, amount x the USD rate of its created_at's day, rounded
    half away from zero to the cent (docs/contract.md), summed per customer."""
    rates = {(r["rate_date"], r["currency"]): r["usd_rate"] for r in fx.iter_rows(named=True)}
    events = {r.event.event_id: r.event for r in records if r.kind == "valid" and r.event}
    totals: dict[int, Decimal] = defaultdict(lambda: Decimal("0.00"))
    for event in events.values():
        rate = (
            Decimal(1)
            if event.currency == "USD"
            else rates[(event.created_at.date(), event.currency)]
        )
        totals[event.customer_id] += (event.amount * rate).quantize(CENT, rounding=ROUND_HALF_UP)
    return dict(totals)


@dataclass
class Verdict:
    lines: list[tuple[str, object]] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def figure(self, name: str, value: object, *, bad: bool = False) -> None:
        self.lines.append((name, value))
        if bad:
            self.wrong.append(name)


def _counts(frame: pl.DataFrame | None, columns: list[str]) -> tuple[int, int, set]:
    """(rows, rows beyond the first of each key, the distinct keys)."""
    if frame is None or frame.is_empty():
        return 0, 0, set()
    keys = frame.select(columns).unique()
    return frame.height, frame.height - keys.height, set(keys.iter_rows())


def compare(
    stack: Stack, records: list[GeneratedRecord], ends: dict[int, int], verdict: Verdict
) -> None:
    valid_ids = {r.event.event_id for r in records if r.kind == "valid" and r.event}
    invalid = sum(r.kind == "invalid" for r in records)

    # Balances, to the cent, against an independent recomputation.
    expected = expected_balances(records, load_reference_data(stack.lake).fx_rates)
    actual = dict(
        _serving_query(
            stack.serving_url, "SELECT customer_id, current_balance FROM customer_balances"
        )
    )
    customers = set(expected) | set(actual)
    wrong = sorted(c for c in customers if expected.get(c) != actual.get(c))
    verdict.figure("balances compared", len(customers))
    verdict.figure("balances wrong", len(wrong), bad=bool(wrong))
    for customer in wrong[:10]:
        print(
            f"  customer {customer}: expected {expected.get(customer)}, "
            f"Postgres {actual.get(customer)}"
        )

    # transaction_history: each valid event once.
    history = dict(
        _serving_query(
            stack.serving_url,
            "SELECT event_id, count(*) FROM transaction_history GROUP BY event_id",
        )
    )
    missing = len(valid_ids - set(history))
    doubled = sum(n - 1 for n in history.values())
    unexpected = len(set(history) - valid_ids)
    verdict.figure("distinct valid events produced", len(valid_ids))
    verdict.figure("transaction_history rows", sum(history.values()))
    verdict.figure("events missing (history)", missing, bad=bool(missing))
    verdict.figure("events doubled (history)", doubled, bad=bool(doubled))
    verdict.figure("events not produced (history)", unexpected, bad=bool(unexpected))

    # The lake: billing_events each valid event once; every Kafka offset once in raw/
    # (undecodable records: in quarantine only), quarantine each malformed record once.
    topic = pl.col("kafka_topic") == stack.topic
    position = ["kafka_partition", "kafka_offset"]
    events = _lake(stack, BILLING_EVENTS_TABLE, topic)
    ids = set(events["event_id"]) if events is not None else set()
    rows = 0 if events is None else events.height
    extra = rows - len(ids)
    lake_missing, lake_unexpected = len(valid_ids - ids), len(ids - valid_ids)
    verdict.figure("billing_events rows", rows)
    verdict.figure("events missing (billing_events)", lake_missing, bad=bool(lake_missing))
    verdict.figure("events doubled (billing_events)", extra, bad=bool(extra))
    verdict.figure(
        "events not produced (billing_events)", lake_unexpected, bad=bool(lake_unexpected)
    )
    raw = _lake(stack, RAW_TABLE, topic)
    quarantine = _lake(stack, QUARANTINE_TABLE, topic)
    if extra:
        doubled_ids = events.filter(pl.col("event_id").is_duplicated())["event_id"].unique()
        columns = ["event_id", *position, "created_at", "ingest_run_id", "ingested_at"]
        with pl.Config(tbl_rows=50, tbl_cols=10, fmt_str_lengths=40, tbl_width_chars=200):
            print("  billing_events rows of the doubled event_ids:")
            print(events.filter(pl.col("event_id").is_in(doubled_ids.implode())).select(columns))
            if raw is not None:
                print("  their deliveries in raw/:")
                print(
                    raw.filter(pl.col("event_id").is_in(doubled_ids.implode())).select(
                        [c for c in columns if c in raw.columns]
                    )
                )

    q_rows, q_extra, q_positions = _counts(quarantine, position)
    verdict.figure(
        "quarantined rows (malformed produced)", f"{q_rows:,} ({invalid:,})", bad=q_rows != invalid
    )
    verdict.figure("quarantine offsets doubled", q_extra, bad=bool(q_extra))
    _, _, accepted_positions = _counts(events, position)
    both = len(accepted_positions & q_positions)
    verdict.figure("offsets accepted and quarantined", both, bad=bool(both))

    r_rows, r_extra, positions = _counts(raw, position)
    every = {(p, o) for p, end in ends.items() for o in range(end)}
    r_missing = len(every - positions - q_positions)
    r_unexpected = len(positions - every)
    verdict.figure("Kafka offsets", len(every))
    verdict.figure("raw/ rows", r_rows)
    verdict.figure("offsets in neither raw/ nor quarantine", r_missing, bad=bool(r_missing))
    verdict.figure("offsets doubled (raw/)", r_extra, bad=bool(r_extra))
    verdict.figure("offsets beyond Kafka's (raw/)", r_unexpected, bad=bool(r_unexpected))


def keep_evidence(stack: Stack, instance: dg.DagsterInstance, directory: Path) -> None:
    """The lake, the daemon logs and compute logs, every ingest run's event log and the
    serving ledger, for a failed soak (the stack itself is thrown away)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(stack.workdir, directory / "workdir", dirs_exist_ok=True, symlinks=True)
    with (directory / "runs.txt").open("w") as out:
        records = instance.get_run_records(
            dg.RunsFilter(job_name=INGEST_JOB), order_by="create_timestamp", ascending=True
        )
        for record in records:
            run = record.dagster_run
            out.write(f"\n=== run {run.run_id} {run.status.value} tags {dict(run.tags)}\n")
            for event in instance.all_logs(run.run_id):
                kind = event.dagster_event_type.value if event.dagster_event_type else "log"
                if kind.startswith(("ASSET_MATERIALIZATION_PLANNED", "ASSET_CHECK_EVALUATION_P")):
                    continue
                out.write(
                    f"{datetime.fromtimestamp(event.timestamp):%H:%M:%S.%f} {kind} "
                    f"{event.step_key or ''} {(event.message or '')[:2000]}\n"
                )
    rows = _serving_query(
        stack.serving_url,
        "SELECT applied_at, kind, run_id, events_applied, offset_ranges::text "
        "FROM balance_batches ORDER BY applied_at",
    )
    with (directory / "balance_batches.txt").open("w") as out:
        for row in rows:
            out.write(" | ".join(str(v) for v in row) + "\n")
    log(f"evidence kept in {directory}")


def _lake(stack: Stack, name: str, where: pl.Expr) -> pl.DataFrame | None:
    scan = scan_table(stack.lake, name)
    return None if scan is None else scan.filter(where).collect()


def run_figures(instance: dg.DagsterInstance, verdict: Verdict) -> None:
    records = instance.get_run_records(dg.RunsFilter(job_name=INGEST_JOB))
    statuses = Counter(r.dagster_run.status.value for r in records)
    repairs = sum(REPAIR_TAG in r.dagster_run.tags for r in records)
    retries = sum("dagster/parent_run_id" in r.dagster_run.tags for r in records)
    verdict.figure(
        "ingest runs",
        f"{len(records)}: "
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(statuses.items()))
        + f" ({retries} of them retries of a failed run, {repairs} sensor-requested repairs)",
    )


def repair_figures(url: str, verdict: Verdict) -> None:
    rows = _serving_query(
        url,
        "SELECT applied_at, run_id, events_applied, amount_usd_total::text, offset_ranges "
        "FROM balance_batches WHERE kind = 'repair' AND events_applied > 0 ORDER BY applied_at",
    )
    verdict.figure("repairs recorded (kind='repair', events_applied > 0)", len(rows))
    for applied_at, run_id, events, amount, ranges in rows:
        text = " ".join(f"{r['partition']}:{r['start']}-{r['end']}" for r in ranges)
        print(
            f"  repair {applied_at:%H:%M:%S} run {run_id[:8]}: {events} events, "
            f"{amount} USD at {text}"
        )


# ---- main --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--faults", type=int, default=12)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--duplicate-rate", type=float, default=0.01)
    parser.add_argument("--invalid-rate", type=float, default=0.005)
    parser.add_argument(
        "--trigger-timeout",
        type=float,
        default=600,
        help="seconds a fault waits for its moment (a commit, a running ingest run)",
    )
    parser.add_argument(
        "--fault-gap", type=float, default=15, help="seconds at least between two faults"
    )
    parser.add_argument("--drain-timeout", type=float, default=1800)
    parser.add_argument(
        "--evidence",
        type=Path,
        default=Path("/tmp/chaos-evidence"),
        help="where a failed soak keeps the lake, logs, run event logs and ledger",
    )
    parser.add_argument(
        "--run-monitoring",
        action="store_true",
        help="shorter run monitoring limits than dev/dagster.yaml's: runs stranded by a "
        "killed daemon are failed after a 120 s start timeout / 240 s maximum runtime",
    )
    args = parser.parse_args()
    stop_on_sigterm()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    rng = random.Random(args.seed)
    print(f"machine: {machine()}")
    print(
        f"load: {args.events:,} events at {args.rate:,.0f}/s ({args.duplicate_rate:.1%} duplicate "
        f"deliveries, {args.invalid_rate:.1%} malformed, {args.customers:,} customers, seed "
        f"{args.seed}); {args.faults} faults; serving Postgres non-durable "
        f"(fsync, synchronous_commit, full_page_writes off, wal_writer_delay 10 s); Dagster "
        + (
            "instance: dev/dagster.yaml + run monitoring (start timeout 120 s, max runtime 240 s)"
            if args.run_monitoring
            else "instance: dev/dagster.yaml as is"
        )
    )
    verdict = Verdict()
    faults = Faults()
    with (
        LocalPostgres(durable=False, settings=NON_DURABLE_SETTINGS) as serving,
        pipeline_stack(
            customers=args.customers, extra_env={"BILLING_POSTGRES_URL": serving.url}
        ) as harness_stack,
        ExitStack() as stack_context,
    ):
        if args.run_monitoring:
            with (harness_stack.home / "dagster.yaml").open("a") as instance_yaml:
                instance_yaml.write(RUN_MONITORING)
        instance = stack_context.enter_context(dg.DagsterInstance.get())
        migrate(serving.url)
        stack = replace(harness_stack, serving_url=serving.url)
        daemon = Daemon(stack)
        daemon.start()
        try:
            stream = RecordingStream(
                seed=args.seed,
                customers=args.customers,
                duplicate_rate=args.duplicate_rate,
                invalid_rate=args.invalid_rate,
            )
            producer = make_producer(stack.bootstrap)
            produced: Counter = Counter()
            window = args.events / args.rate
            plan = fault_plan(args.faults, window, rng)
            log(
                f"producing for ~{window:.0f} s; faults planned at "
                + ", ".join(f"{t:.0f} s {k}" for t, k in plan)
            )

            def produce() -> None:
                produced.update(
                    produce_at_rate(
                        producer, stack.topic, stream, rate=args.rate, count=args.events
                    )
                )

            producing = threading.Thread(target=produce, name="producer", daemon=True)
            started = time.monotonic()
            producing.start()

            def idle() -> bool:
                return not producing.is_alive() and not drain_state(
                    stack, instance, end_offsets(stack)
                )

            earliest = 0.0
            for at, kind in plan:
                time.sleep(max(0.0, started + max(at, earliest) - time.monotonic()))
                patience = Patience(args.trigger_timeout, idle)
                if kind == "postgres":
                    done = stop_postgres_after_commit(
                        serving, stack.serving_url, rng, faults, patience
                    )
                elif kind == "worker":
                    done = kill_run_worker(instance, daemon, rng, patience)
                else:
                    done = kill_daemon(instance, daemon, rng)
                if done:
                    faults.injected[kind] += 1
                else:
                    faults.skipped[kind] += 1
                    log(f"fault {kind} skipped: {patience.reason}")
                # Overdue faults (after a stall) still come apart, not in one burst.
                earliest = time.monotonic() - started + args.fault_gap
            producing.join()
            log(f"produced {sum(produced.values()):,} events: {dict(produced)}")
            ends = end_offsets(stack)

            deadline = time.monotonic() + args.drain_timeout
            last_report = 0.0
            drained = False
            while time.monotonic() < deadline:
                try:
                    waiting = drain_state(stack, instance, ends)
                except Exception as exc:  # a store still restarting
                    waiting = [f"cannot read the state yet: {exc}"]
                if not waiting:
                    drained = True
                    break
                if time.monotonic() - last_report > 60:
                    log("waiting for the drain: " + "; ".join(waiting))
                    last_report = time.monotonic()
                time.sleep(2)
            wall = time.monotonic() - started
            if drained:
                log(f"drained {wall:.0f} s after production started")
            else:
                log(
                    "NOT DRAINED within the timeout: "
                    + "; ".join(drain_state(stack, instance, ends))
                )
                log(f"run workers alive: {run_workers(daemon.process.pid) or 'none'}")
                for line in stranded_runs(instance):
                    log(line)
                verdict.figure("drained", "no", bad=True)

            verdict.figure("events produced", f"{len(stream.produced):,} {dict(produced)}")
            verdict.figure(
                "faults injected",
                f"{sum(faults.injected.values())}: "
                + ", ".join(f"{k} {faults.injected[k]}" for k in KINDS)
                + (f" (skipped: {dict(faults.skipped)})" if faults.skipped else ""),
            )
            verdict.figure(
                "postgres stops: commit lost / survived",
                f"{faults.commits_lost} / {faults.commits_survived}",
            )
            verdict.figure("daemon starts", daemon.starts)
            run_figures(instance, verdict)
            repair_figures(stack.serving_url, verdict)
            compare(stack, stream.produced, ends, verdict)
            verdict.figure("wall time (production start -> drained)", f"{wall:.0f} s")
            if verdict.wrong:
                keep_evidence(stack, instance, args.evidence / datetime.now().strftime("%H%M%S"))
        finally:
            daemon.stop()

    print()
    width = max(len(name) for name, _ in verdict.lines)
    for name, value in verdict.lines:
        print(
            f"{name:{width}s}  {value:,}" if isinstance(value, int) else f"{name:{width}s}  {value}"
        )
    print()
    if verdict.wrong:
        print("WRONG: " + ", ".join(verdict.wrong))
        return 1
    print("exactly once: every balance to the cent, every event once, every offset once")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
