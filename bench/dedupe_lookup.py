"""The global dedupe lookup against a large history: `accepted_before_in_serving` (and,
for comparison, `accepted_before_in_lake`) for one batch, as the history grows.

For each --history size the script starts a throwaway Postgres (durable, as the pipeline
runs it), migrates it and bulk-loads that many `transaction_history` rows with random
UUID event ids, spread evenly over the ten days before END (two monthly partitions), the
way a bulk load would: the primary key dropped, the rows COPYed (CSV, FREEZE) straight
into their monthly partitions, the key built again, then VACUUM ANALYZE and a CHECKPOINT.
It then times (wall, and CPU here plus in the Postgres server)
`accepted_before_in_serving`, the function the ingest step calls, for batches of --batch
events timed just after the history:

- new: every event_id is new (the normal case);
- 1% redelivered: 1% of the batch re-sends ids accepted at random times over the 7-day
  horizon (without their event time, so they carry the batch's: the case a lookup
  limited to the batch's event hours misses);

--repeats fresh batches each (median reported), and checks the lookup finds exactly the
redelivered ids, at their original Kafka positions. One more redelivered batch is run
under EXPLAIN ANALYZE, with the planner's choice and with the primary-key probe forced,
to show where the time goes (planning, execution, the rest: building, sending and
parsing the 100K-element array). Before timing, it waits up to --settle seconds for a
quiet machine (load average < 1.5) and prints the load average with each figure: on a
shared machine the CPU figures are the ones to compare.
--lake-history N (0: skip) does the same with `accepted_before_in_lake` over an N-row
billing_events Delta table (event-hour partitions, PRIOR columns only).

    .venv/bin/python bench/dedupe_lookup.py --history 10000000,50000000 --lake-history 10000000
"""

from __future__ import annotations

import argparse
import io
import os
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import numpy as np
import polars as pl
import pyarrow as pa
from deltalake import write_deltalake
from machine_info import machine  # bench/ is the script folder, so on sys.path

from billing_dagster.cleaning import PRIOR_COLUMNS
from billing_dagster.contract import (
    BILLING_EVENTS_SCHEMA,
    BILLING_EVENTS_TABLE,
    EVENT_HOUR_PARTITIONS,
)
from billing_dagster.dedupe import (
    _SERVING_LOOKUP,
    DEFAULT_HORIZON,
    accepted_before_in_lake,
    accepted_before_in_serving,
    horizon_window,
)
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.local_infra.postgres import LocalPostgres
from billing_dagster.postgres_db import connect, migrate
from billing_dagster.serving import ensure_partitions, partition_name

TOPIC = "billing-events"
KAFKA_PARTITIONS = 24
CUSTOMERS = 1_000_000
#: The history covers the ten days before END, across November and December.
END = datetime(2026, 12, 2, tzinfo=UTC)
START = END - timedelta(days=10)
MONTHS = [date(2026, 11, 1), date(2026, 12, 1)]
#: A batch's events are timed within this long after END (a batch is seconds of traffic).
BATCH_SPREAD = timedelta(seconds=60)
CHUNK = 1_000_000
CENT = Decimal("0.01")


def random_uuids(rng: np.random.Generator, n: int) -> pl.Series:
    """n random version-4 UUIDs, lower-case canonical text (as producers send them)."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16), n, [None, pa.py_buffer(raw.tobytes())]
    )
    hexed = pl.Series("u", fixed).cast(pl.Binary).bin.encode("hex")
    parts = [(0, 8), (8, 4), (12, 4), (16, 4), (20, 12)]
    return pl.select(
        pl.concat_str([hexed.str.slice(o, n) for o, n in parts], separator="-").alias("event_id")
    ).to_series()


def created_at_of(index: np.ndarray, total: int) -> np.ndarray:
    """Event time of history row `index`: rows evenly spaced from START to END, in order
    (the history is appended as time goes by)."""
    span_us = (END - START) / timedelta(microseconds=1)
    return (index * (span_us / total)).astype(np.int64)


def history_chunk(first: int, size: int, total: int, seed: int) -> pl.DataFrame:
    """History rows first..first+size-1 of `total`, in transaction_history's column order
    (plus `i`, the row number)."""
    rng = np.random.default_rng([seed, first])
    index = np.arange(first, first + size, dtype=np.int64)
    offsets_us = created_at_of(index, total)
    cents = rng.integers(100, 50_000, size=size)
    types = index % 10
    sign = np.where((types == 7) | (types == 8), -1, 1)
    type_names = dict(enumerate(["PAYMENT"] * 7 + ["REFUND", "CHARGEBACK", "ADJUSTMENT"]))
    event_id = random_uuids(rng, size)
    # Decimal(18, 0) / 100 would keep scale 0 (whole units): scale 2 first.
    amount = (pl.col("cents").cast(pl.Decimal(18, 2)) * pl.lit(CENT)).cast(pl.Decimal(12, 2))
    return pl.DataFrame(
        {
            "i": index,
            "event_id": event_id,
            "customer_id": rng.integers(1, CUSTOMERS + 1, size=size),
            "cents": cents * sign,
            "type_no": types,
            "us": offsets_us,
        }
    ).select(
        "i",
        pl.col("event_id").alias("transaction_id"),
        "customer_id",
        amount.alias("amount"),
        pl.col("type_no")
        .replace_strict(type_names, return_dtype=pl.String)
        .alias("transaction_type"),
        (pl.lit(START) + pl.duration(microseconds=pl.col("us"))).alias("created_at"),
        pl.lit("USD").alias("currency"),
        amount.alias("amount_usd"),
        "event_id",
        pl.lit(TOPIC).alias("kafka_topic"),
        (pl.col("i") % KAFKA_PARTITIONS).cast(pl.Int32).alias("kafka_partition"),
        (pl.col("i") // KAFKA_PARTITIONS).alias("kafka_offset"),
    )


def redelivery_sample(total: int, count: int, seed: int) -> np.ndarray:
    """Row numbers of `count` history rows accepted within the horizon before END."""
    first = int(total * ((END - DEFAULT_HORIZON - START) / (END - START))) + 1
    assert created_at_of(np.array([first]), total)[0] >= (
        END - DEFAULT_HORIZON - START
    ) / timedelta(microseconds=1)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.arange(first, total), size=count, replace=False))


@dataclass
class Piece:
    table: str
    csv: bytes
    rows: int


def history_pieces(
    total: int, seed: int, sample: np.ndarray, sampled: list[pl.DataFrame]
) -> Iterator[Piece]:
    """CSV pieces of the history, one per chunk and month partition, in time order; the
    sampled rows' ids and positions are appended to `sampled` on the way."""
    december = datetime(2026, 12, 1, tzinfo=UTC)
    for first in range(0, total, CHUNK):
        chunk = history_chunk(first, min(CHUNK, total - first), total, seed)
        sampled.append(
            chunk.filter(pl.col("i").is_in(sample)).select(
                "event_id", "kafka_topic", "kafka_partition", "kafka_offset", "created_at"
            )
        )
        chunk = chunk.drop("i")
        for month, rows in (
            (MONTHS[0], chunk.filter(pl.col("created_at") < december)),
            (MONTHS[1], chunk.filter(pl.col("created_at") >= december)),
        ):
            if rows.height:
                buffer = io.BytesIO()
                rows.write_csv(
                    buffer,
                    include_header=False,
                    datetime_format="%Y-%m-%d %H:%M:%S%.6f+00",
                )
                yield Piece(partition_name(month), buffer.getvalue(), rows.height)


def in_background(pieces: Iterator[Piece], depth: int = 2) -> Iterator[Piece]:
    """The same pieces, generated in a thread while the caller COPYs the previous ones."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for piece in pieces:
                handoff.put(piece)
            handoff.put(done)
        except BaseException as exc:
            handoff.put(exc)

    threading.Thread(target=produce, daemon=True).start()
    while (item := handoff.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


@dataclass
class Loaded:
    rows: int
    copy_s: float
    key_s: float
    vacuum_s: float
    heap_bytes: int
    index_bytes: int
    redelivered: pl.DataFrame

    @property
    def load_s(self) -> float:
        return self.copy_s + self.key_s + self.vacuum_s


def load_history(url: str, total: int, seed: int, sample: np.ndarray) -> Loaded:
    sampled: list[pl.DataFrame] = []
    with connect(url) as connection:
        ensure_partitions(connection, MONTHS)
        with connection, connection.cursor() as cursor:
            cursor.execute(
                "ALTER TABLE transaction_history DROP CONSTRAINT transaction_history_pkey"
            )
        started = time.perf_counter()
        current = None
        with connection.cursor() as cursor:
            for piece in in_background(history_pieces(total, seed, sample, sampled)):
                if piece.table != current:
                    # One transaction per partition, truncated first: COPY FREEZE writes
                    # the rows frozen, so no vacuum has to rewrite the pages afterwards.
                    connection.commit()
                    cursor.execute(f"TRUNCATE {piece.table}")
                    current = piece.table
                cursor.copy_expert(
                    f"COPY {piece.table} FROM STDIN WITH (FORMAT csv, FREEZE)",
                    io.BytesIO(piece.csv),
                    size=1 << 20,
                )
            connection.commit()
        copied = time.perf_counter()
        with connection, connection.cursor() as cursor:
            cursor.execute("SET maintenance_work_mem = '2GB'")
            cursor.execute(
                "ALTER TABLE transaction_history ADD PRIMARY KEY (transaction_id, created_at)"
            )
        keyed = time.perf_counter()
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("VACUUM (ANALYZE) transaction_history")
            cursor.execute("CHECKPOINT")
            vacuumed = time.perf_counter()
            cursor.execute(
                "SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree('transaction_history') "
                "WHERE isleaf"
            )
            heap = int(cursor.fetchone()[0])
            cursor.execute(
                "SELECT sum(pg_relation_size(indexrelid)) FROM pg_index WHERE indrelid IN "
                "(SELECT relid FROM pg_partition_tree('transaction_history') WHERE isleaf)"
            )
            index = int(cursor.fetchone()[0])
            cursor.execute("SELECT count(*) FROM transaction_history")
            assert cursor.fetchone()[0] == total
    return Loaded(
        total,
        copied - started,
        keyed - copied,
        vacuumed - keyed,
        heap,
        index,
        pl.concat(sampled).sort("created_at"),
    )


def batch(size: int, redelivered: pl.DataFrame, seed: int) -> pl.DataFrame:
    """A decoded batch (event_id, created_at) of `size` events timed just after END: the
    redelivered ids (carrying the batch's time, as a re-send without created_at does) and
    new ids for the rest."""
    rng = np.random.default_rng(seed)
    ids = pl.concat([redelivered["event_id"], random_uuids(rng, size - redelivered.height)])
    spread_us = int(BATCH_SPREAD / timedelta(microseconds=1))
    return (
        pl.DataFrame({"event_id": ids, "us": rng.integers(0, spread_us, size=size)})
        .select(
            "event_id",
            (pl.lit(END) + pl.duration(microseconds=pl.col("us"))).alias("created_at"),
        )
        .sample(fraction=1.0, shuffle=True, seed=seed)
    )


def check(found: pl.DataFrame, redelivered: pl.DataFrame) -> None:
    """Exactly the redelivered ids, each at its original Kafka position."""
    positions = ["event_id", "kafka_topic", "kafka_partition", "kafka_offset"]
    assert found.height == redelivered.height, (found.height, redelivered.height)
    assert (
        found.select(positions)
        .sort("event_id")
        .equals(redelivered.select(positions).sort("event_id"))
    ), "lookup found other rows than the redelivered ones"


class CpuClock:
    """CPU seconds used by this process (all its threads) and by a Postgres server (the
    postmaster and its children, exited ones included: the postmaster reaps them). On a
    shared machine CPU time says what a lookup costs; wall time, what it took there."""

    def __init__(self, postgres: LocalPostgres | None) -> None:
        pid_file = postgres.datadir / "postmaster.pid" if postgres else None
        self.postmaster = int(pid_file.read_text().split()[0]) if pid_file else None
        self.tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _stat(pid: str | int) -> list[str]:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()

    def server(self) -> float:
        if self.postmaster is None:
            return 0.0
        # After ")": state, ppid, ... utime, stime, cutime, cstime are the 12th to 15th.
        ticks = sum(int(v) for v in self._stat(self.postmaster)[11:15])
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    fields = self._stat(pid)
                except OSError:
                    continue
                if int(fields[1]) == self.postmaster:
                    ticks += int(fields[11]) + int(fields[12])
        return ticks / self.tick

    def measure(self, fn):
        """fn(), its wall seconds, and the CPU seconds it used here and in Postgres."""
        client, server = time.process_time(), self.server()
        started = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - started
        client = time.process_time() - client
        time.sleep(0.3)  # the lookup's backend has exited and been reaped
        return result, wall, client, self.server() - server


@dataclass
class Timing:
    source: str
    history: int
    case: str
    batch: int
    runs: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    load: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(map(sum, self.cpu_runs))

    @property
    def cpu_runs(self) -> list[tuple[float, float]]:
        return list(zip(self.client_cpu, self.server_cpu, strict=True))


def settle(limit_s: float) -> None:
    """Wait (up to limit_s) for the machine to be quiet: load average under 1.5."""
    started = time.monotonic()
    while os.getloadavg()[0] >= 1.5 and time.monotonic() - started < limit_s:
        time.sleep(5)
    print(
        f"  load average {os.getloadavg()[0]:.2f} after waiting "
        f"{time.monotonic() - started:.0f} s for a quiet machine"
    )


def time_lookups(
    source, lookup, clock: CpuClock, history: int, args, redelivered: pl.DataFrame
) -> list[Timing]:
    per_batch = args.batch // 100
    settle(args.settle)
    timings = []
    for case, share in (("new", 0), ("1% redelivered", per_batch)):
        timing = Timing(source, history, case, args.batch)
        for repeat in range(args.repeats):
            expected = redelivered.slice(repeat * per_batch, share)
            events = batch(args.batch, expected, seed=1000 * (share > 0) + repeat)
            found, wall, client, server = clock.measure(lambda events=events: lookup(events))
            timing.runs.append(wall)
            timing.client_cpu.append(client)
            timing.server_cpu.append(server)
            check(found, expected)
        runs = timing.runs
        timing.load = os.getloadavg()[0]
        print(
            f"  {source} lookup, {case} (load average {timing.load:.2f}): runs "
            f"{', '.join(f'{r:.3f}' for r in runs)} s, "
            f"median {timing.median:.3f} s = {timing.median / args.batch * 1e6:.1f} µs/event; "
            f"CPU {', '.join(f'{c:.2f}+{s:.2f}' for c, s in timing.cpu_runs)} s "
            f"(here + Postgres), median {timing.cpu:.2f} s = "
            f"{timing.cpu / args.batch * 1e6:.1f} µs/event"
        )
        timings.append(timing)
    return timings


@dataclass
class Explained:
    """One EXPLAIN (ANALYZE) of the serving lookup's query, as `accepted_before_in_serving`
    sends it (one array literal), with the planner's own choice and with the probe of the
    primary key forced (which the lookup itself forces)."""

    setting: str
    scan: str
    wall_s: float
    planning_ms: float
    execution_ms: float
    cpu_s: float

    @property
    def other_s(self) -> float:
        """Building and sending the statement, parsing it, fetching the plan."""
        return self.wall_s - (self.planning_ms + self.execution_ms) / 1000


def explain(clock: CpuClock, url: str, events: pl.DataFrame, setting: str = "") -> Explained:
    low, high = horizon_window(events, DEFAULT_HORIZON)

    def run() -> list[str]:
        with connect(url) as connection, connection.cursor() as cursor:
            if setting:
                cursor.execute(setting)
            cursor.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + _SERVING_LOOKUP,
                ("{" + ",".join(events["event_id"].unique().to_list()) + "}", low, high),
            )
            return [row[0] for row in cursor.fetchall()]

    plan, wall, client, server = clock.measure(run)

    def ms(label: str) -> float:
        return float(next(line for line in plan if line.startswith(label)).split()[2])

    scans = [
        line.strip().removeprefix("->  ").split(" on ")[0].split(" using ")[0]
        for line in plan
        if " on " in line
    ]
    explained = Explained(
        "primary-key probe forced" if setting else "planner's choice",
        " + ".join(dict.fromkeys(scans)),
        wall,
        ms("Planning Time"),
        ms("Execution Time"),
        client + server,
    )
    print(
        f"  EXPLAIN ANALYZE, {explained.setting}: {explained.scan}; wall {wall:.2f} s = "
        f"planning {explained.planning_ms:.0f} ms + execution {explained.execution_ms:.0f} ms "
        f"+ other {explained.other_s:.2f} s; CPU {client:.2f} s here + {server:.2f} s Postgres"
    )
    for line in plan:
        if "Buffers" in line:
            print(f"    {line.strip()}")
            break
    return explained


FORCE_INDEX = "SET enable_seqscan = off; SET enable_bitmapscan = off"


def serving_run(total: int, args) -> tuple[Loaded, list[Timing], list[Explained]]:
    sample = redelivery_sample(total, args.repeats * (args.batch // 100) + 1000, seed=total)
    postgres = LocalPostgres(database="dedupe_bench").start()
    try:
        migrate(postgres.url)
        loaded = load_history(postgres.url, total, seed=11, sample=sample)
        print(
            f"history {total:,} rows: loaded in {loaded.load_s:.1f} s (generate + COPY "
            f"{loaded.copy_s:.1f} s, primary key {loaded.key_s:.1f} s, VACUUM ANALYZE + "
            f"CHECKPOINT {loaded.vacuum_s:.1f} s); heap {loaded.heap_bytes / 2**30:.2f} GiB, "
            f"indexes {loaded.index_bytes / 2**30:.2f} GiB"
        )
        redelivered = loaded.redelivered.sample(fraction=1.0, shuffle=True, seed=3)
        clock = CpuClock(postgres)
        timings = time_lookups(
            "serving",
            lambda events: accepted_before_in_serving(postgres.url, events, DEFAULT_HORIZON),
            clock,
            total,
            args,
            redelivered,
        )
        # One more 1%-redelivered batch: where the time goes, with the planner's choice and
        # with the primary-key probe forced.
        spare = redelivered.slice(args.repeats * (args.batch // 100), args.batch // 100)
        events = batch(args.batch, spare, seed=99)
        explained = [explain(clock, postgres.url, events, s) for s in ("", FORCE_INDEX)]
        return loaded, timings, explained
    finally:
        postgres.stop()


def lake_run(total: int, args) -> list[Timing]:
    columns = [*PRIOR_COLUMNS, "created_at", *EVENT_HOUR_PARTITIONS]
    schema = {c: BILLING_EVENTS_SCHEMA[c] for c in columns}
    sample = redelivery_sample(total, args.repeats * (args.batch // 100), seed=total + 1)
    with tempfile.TemporaryDirectory(prefix="dedupe-lake-") as root:
        lake = LakeLocation(root)
        sampled = []
        started = time.perf_counter()
        for first in range(0, total, CHUNK):
            chunk = history_chunk(first, min(CHUNK, total - first), total, seed=12)
            sampled.append(
                chunk.filter(pl.col("i").is_in(sample)).select(
                    "event_id", "kafka_topic", "kafka_partition", "kafka_offset", "created_at"
                )
            )
            rows = chunk.with_columns(
                pl.col("created_at").dt.year().alias("year"),
                pl.col("created_at").dt.month().alias("month"),
                pl.col("created_at").dt.day().alias("day"),
                pl.col("created_at").dt.hour().alias("hour"),
            ).select([pl.col(c).cast(t) for c, t in schema.items()])
            write_deltalake(
                lake.table_uri(BILLING_EVENTS_TABLE),
                rows.to_arrow(),
                mode="append",
                partition_by=list(EVENT_HOUR_PARTITIONS),
            )
        print(
            f"lake billing_events {total:,} rows ({len(EVENT_HOUR_PARTITIONS)}-level event-hour "
            f"partitions) written in {time.perf_counter() - started:.1f} s"
        )
        redelivered = pl.concat(sampled).sample(fraction=1.0, shuffle=True, seed=3)
        return time_lookups(
            "lake",
            lambda events: accepted_before_in_lake(lake, events, DEFAULT_HORIZON),
            CpuClock(None),
            total,
            args,
            redelivered,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--history", default="10000000,50000000", help="history sizes, comma-separated"
    )
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lake-history", type=int, default=0, help="0: no lake comparison")
    parser.add_argument(
        "--settle", type=float, default=300, help="max seconds to wait for a quiet machine"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.history.split(",")]

    print(f"machine: {machine()}")
    print(
        f"history over {START:%Y-%m-%d} .. {END:%Y-%m-%d} (partitions "
        f"{', '.join(partition_name(m) for m in MONTHS)}); batches of {args.batch:,} events "
        f"at {END:%Y-%m-%d %H:%M}+; horizon {DEFAULT_HORIZON.days} days; "
        f"{args.repeats} fresh batches per case"
    )
    results: list[tuple[Loaded | None, Timing]] = []
    explained: list[tuple[int, Explained]] = []
    for total in sizes:
        loaded, timings, plans = serving_run(total, args)
        results += [(loaded, t) for t in timings]
        explained += [(total, e) for e in plans]
    if args.lake_history:
        results += [(None, t) for t in lake_run(args.lake_history, args)]

    print()
    print(
        "| lookup | history rows | load | heap | indexes | batch | wall, median (runs) "
        "| wall per event | CPU, median | CPU per event | load avg |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for loaded, t in results:
        runs = ", ".join(f"{r:.2f}" for r in t.runs)
        print(
            f"| {t.source} | {t.history:,} | "
            + (
                f"{loaded.load_s:.0f} s | {loaded.heap_bytes / 2**30:.2f} GiB | "
                f"{loaded.index_bytes / 2**30:.2f} GiB"
                if loaded
                else "- | - | -"
            )
            + f" | {t.case} | {t.median:.2f} s ({runs}) | {t.median / t.batch * 1e6:.1f} µs "
            f"| {t.cpu:.2f} s | {t.cpu / t.batch * 1e6:.1f} µs | {t.load:.1f} |"
        )
    print()
    print(
        "| history rows | planner setting | plan | wall | planning | execution "
        "| other (build, send, parse) | CPU (here + Postgres) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for total, e in explained:
        print(
            f"| {total:,} | {e.setting} | {e.scan} | {e.wall_s:.2f} s | {e.planning_ms:.0f} ms "
            f"| {e.execution_ms:.0f} ms | {e.other_s:.2f} s | {e.cpu_s:.2f} s |"
        )


if __name__ == "__main__":
    main()
