"""The Postgres transaction of one batch: staged before the lake decides, committed after.

`staged_batch` does all of a batch's work in one transaction and leaves only COMMIT:
1. lock the batch's partitions in `balance_offsets` (FOR UPDATE, in partition order). A
   partition already at or past `end` is skipped; one whose mark is below `start` would
   leave offsets unapplied, so the batch fails (`ServingGapError`) instead of advancing
   over them: the caller applies the gap from billing_events first (`projection.py`);
2. COPY the rows at or above each mark into a staging table shaped (and constrained)
   like transaction_history. Rows Postgres refuses (a value its types or constraints do
   not take) are found by halving the COPY under savepoints and refused alone, rule
   `serving:refused`; rows that would carry a balance past DECIMAL(12,2) are refused
   alone too, rule `balance:overflow` (balance_overflow.py);
3. INSERT the rest into transaction_history (ON CONFLICT DO NOTHING) and add to each
   balance the sum of the rows *actually inserted* (RETURNING), so per customer
   `current_balance` equals the sum of its history rows by construction; advance
   `balance_offsets` and record the batch in the `balance_batches` ledger.

The ingest run commits billing_events (its decision, without the refused rows, which go
to quarantine) between staging and COMMIT: every error Postgres could raise about the
batch's rows is raised before the lake decides, and the locks taken in step 1 keep any
other writer of these offsets waiting until COMMIT. A crash before COMMIT changes nothing
in Postgres; the lake's decision is then applied by the catch-up from billing_events.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal

import polars as pl
import psycopg2
import psycopg2.extensions

from billing_dagster.balance_overflow import BalanceEvent, Refusal, overflowing_events
from billing_dagster.contract import MONEY_MAX
from billing_dagster.postgres_db import ServingUnavailableError, connect, first_line, redacted
from billing_dagster.serving import (
    BALANCE_CURRENCY,
    BATCH,
    Ranges,
    ServingGapError,
    ServingResult,
    batch_id,
    ensure_partitions,
    history_rows,
    months_of,
    rows_from,
)
from billing_dagster.timing import PhaseClock

REFUSED_RULE = "serving:refused"
#: More refused rows than this in one batch is not a few bad records but a broken
#: deployment (a migration, a constraint): the batch is held, failing the run, instead.
MAX_REFUSED_ROWS = 20

REFUSALS_SCHEMA: dict[str, pl.DataType] = {
    "kafka_partition": pl.Int32(),
    "kafka_offset": pl.Int64(),
    "rule": pl.String(),
    "reason": pl.String(),
}


#: Rows of the batch whose transaction Postgres already holds from another Kafka position:
#: an event_id accepted by another lane (or batch) while this one was deciding.
APPLIED_ELSEWHERE_SCHEMA: dict[str, pl.DataType] = {
    "kafka_partition": pl.Int32(),
    "kafka_offset": pl.Int64(),
    "first_topic": pl.String(),
    "first_partition": pl.Int32(),
    "first_offset": pl.Int64(),
    "same_content": pl.Boolean(),
}


class ServingRefusedError(RuntimeError):
    """Postgres refuses rows the lake has already decided, or too many rows of a batch."""


@dataclass
class StagedBatch:
    """A batch's transaction with everything done but COMMIT."""

    connection: psycopg2.extensions.connection
    result: ServingResult
    #: Rows not staged, by position, with rule and reason (REFUSALS_SCHEMA).
    refused: pl.DataFrame
    #: Rows not inserted: their transaction was applied from another position
    #: (APPLIED_ELSEWHERE_SCHEMA).
    applied_elsewhere: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(schema=APPLIED_ELSEWHERE_SCHEMA)
    )
    clock: PhaseClock = field(default_factory=PhaseClock)
    committed: bool = False

    def commit(self) -> ServingResult:
        self.connection.commit()
        self.committed = True
        self.clock.lap("commit")
        return replace(self.result, timings=dict(self.clock.laps))


@contextmanager
def staged_batch(
    url: str,
    rows: pl.DataFrame,
    *,
    topic: str,
    ranges: Ranges,
    run_id: str,
    kind: str = BATCH,
    may_refuse: bool = True,
) -> Iterator[StagedBatch]:
    """Stage `rows` (every billing_events row of `topic` in `ranges` = {partition: (start,
    end)}, including partitions that hold no row: their marks advance too). The caller
    commits with `.commit()`; leaving the block without it rolls everything back.
    `may_refuse=False` (rows the lake already decided) raises instead of refusing."""
    try:
        with connect(url) as connection:
            created = ensure_partitions(connection, months_of(rows["created_at"]))
            with connection.cursor() as cursor:
                marks = _lock_marks(cursor, topic, ranges)
                staged = _stage_locked(cursor, rows, topic, ranges, marks, run_id, kind)
            if staged.refused.height and not may_refuse:
                raise ServingRefusedError(
                    "Postgres refuses billing_events rows the lake has already decided: "
                    + _describe(staged.refused)
                )
            staged.result = replace(staged.result, partitions_created=tuple(created))
            try:
                yield staged
            finally:
                if not staged.committed:
                    # Closing would roll back too; explicit, for a connection kept open.
                    with contextlib.suppress(psycopg2.Error):
                        connection.rollback()
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise ServingUnavailableError(
            f"serving Postgres at {redacted(url)} failed mid-batch, nothing was committed: "
            f"{first_line(exc)}"
        ) from None


def apply_batch(
    url: str,
    rows: pl.DataFrame,
    *,
    topic: str,
    ranges: Ranges,
    run_id: str,
    kind: str = BATCH,
) -> ServingResult:
    """Stage and commit at once: rows the lake has already decided (a catch-up)."""
    with staged_batch(
        url, rows, topic=topic, ranges=ranges, run_id=run_id, kind=kind, may_refuse=False
    ) as staged:
        return staged.commit()


def _describe(refused: pl.DataFrame) -> str:
    return "; ".join(
        f"{p}:{o} {rule} ({reason})" for p, o, rule, reason in refused.head(3).iter_rows()
    ) + ("" if refused.height <= 3 else f"; and {refused.height - 3} more")


# ---- the transaction -----------------------------------------------------------------


def _lock_marks(cursor: psycopg2.extensions.cursor, topic: str, ranges: Ranges) -> dict[int, int]:
    """The batch's partitions' marks, locked until COMMIT. A partition Postgres has no
    mark for starts at 0: a new serving database (or one restored from before the
    partition existed) has applied nothing of it."""
    partitions = sorted(ranges)
    cursor.execute(
        "INSERT INTO balance_offsets (topic, kafka_partition, next_offset) "
        "SELECT %s, p, 0 FROM unnest(%s::int[]) AS p ON CONFLICT DO NOTHING",
        (topic, partitions),
    )
    cursor.execute(
        "SELECT kafka_partition, next_offset FROM balance_offsets "
        "WHERE topic = %s AND kafka_partition = ANY(%s) "
        "ORDER BY kafka_partition FOR UPDATE",
        (topic, partitions),
    )
    marks = dict(cursor.fetchall())
    gaps = {p: (marks[p], start) for p, (start, _) in ranges.items() if marks[p] < start}
    if gaps:
        raise ServingGapError(
            f"serving marks of {topic} are behind this batch: offsets "
            + ", ".join(f"{p}:{m}-{s}" for p, (m, s) in sorted(gaps.items()))
            + " are not applied; apply them from billing_events first"
        )
    return marks


def _stage_locked(
    cursor: psycopg2.extensions.cursor,
    rows: pl.DataFrame,
    topic: str,
    ranges: Ranges,
    marks: Mapping[int, int],
    run_id: str,
    kind: str,
) -> StagedBatch:
    clock = PhaseClock()
    advance = {p: (marks[p], end) for p, (_, end) in ranges.items() if end > marks[p]}
    no_refusals = pl.DataFrame(schema=REFUSALS_SCHEMA)
    if not advance:
        result = ServingResult(0, rows.height, 0, 0, None, ())
        return StagedBatch(cursor.connection, result, no_refusals, clock=clock)
    fresh = rows_from(rows, {p: start for p, (start, _) in advance.items()})
    refused = _stage_history(cursor, fresh, clock)
    inserted, customers, total = _insert_history_and_balances(cursor, fresh, clock)
    elsewhere = (
        _applied_elsewhere(cursor)
        if inserted < fresh.height - refused.height
        else pl.DataFrame(schema=APPLIED_ELSEWHERE_SCHEMA)
    )
    cursor.execute(
        "UPDATE balance_offsets AS b SET next_offset = t.e, updated_at = NOW() "
        "FROM unnest(%s::int[], %s::bigint[]) AS t(p, e) "
        "WHERE b.topic = %s AND b.kafka_partition = t.p",
        (list(advance), [end for _, end in advance.values()], topic),
    )
    identity = batch_id(topic, advance, kind)
    cursor.execute(
        # clock_timestamp(), not NOW(): the moment the balances are about to commit,
        # not when the transaction began (the latency benchmark reads it).
        "INSERT INTO balance_batches (batch_id, topic, offset_ranges, run_id, "
        "events_applied, customers_updated, amount_usd_total, applied_at, kind) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, clock_timestamp(), %s) ON CONFLICT DO NOTHING",
        (
            identity,
            topic,
            json.dumps(
                [{"partition": p, "start": s, "end": e} for p, (s, e) in sorted(advance.items())]
            ),
            run_id,
            inserted,
            customers,
            total,
            kind,
        ),
    )
    result = ServingResult(
        inserted,
        rows.height - inserted - refused.height,
        customers,
        inserted,
        identity,
        (),
        dict(sorted(advance.items())),
        total,
    )
    return StagedBatch(cursor.connection, result, refused, elsewhere, clock=clock)


def _applied_elsewhere(cursor: psycopg2.extensions.cursor) -> pl.DataFrame:
    """Staged rows the INSERT skipped because the history holds their transaction from
    another position. The INSERT waited for the other writer's commit, so this
    statement's snapshot sees its row."""
    cursor.execute(
        "SELECT s.kafka_partition, s.kafka_offset, h.kafka_topic, h.kafka_partition, "
        "h.kafka_offset, (s.customer_id = h.customer_id AND s.amount = h.amount "
        "AND s.currency = h.currency AND s.transaction_type = h.transaction_type) "
        "FROM staging_history s JOIN transaction_history h "
        "ON h.transaction_id = s.transaction_id AND h.created_at = s.created_at "
        "WHERE (h.kafka_topic, h.kafka_partition, h.kafka_offset) "
        "IS DISTINCT FROM (s.kafka_topic, s.kafka_partition, s.kafka_offset)"
    )
    return pl.DataFrame(cursor.fetchall(), schema=APPLIED_ELSEWHERE_SCHEMA, orient="row")


def _stage_history(
    cursor: psycopg2.extensions.cursor, fresh: pl.DataFrame, clock: PhaseClock
) -> pl.DataFrame:
    """COPY `fresh` into staging_history, refusing rows Postgres or the balances cannot
    take (REFUSALS_SCHEMA)."""
    # INCLUDING CONSTRAINTS: a CHECK on transaction_history refuses its row here, where
    # one row can be set aside, not in the INSERT below, where it would fail the batch.
    cursor.execute(
        "CREATE TEMP TABLE staging_history (LIKE transaction_history "
        "INCLUDING DEFAULTS INCLUDING CONSTRAINTS) ON COMMIT DROP"
    )
    refusals: list[Refusal] = []
    if not fresh.is_empty():
        _copy_isolating(cursor, history_rows(fresh), refusals)
    clock.lap("copy_history")
    over = _refuse_overflows(cursor)
    if over:
        cursor.execute(
            "DELETE FROM staging_history s USING unnest(%s::int[], %s::bigint[]) AS r(p, o) "
            "WHERE s.kafka_partition = r.p AND s.kafka_offset = r.o",
            ([r.kafka_partition for r in over], [r.kafka_offset for r in over]),
        )
        refusals += over
    clock.lap("check_balance_limits")
    return pl.DataFrame(
        [(r.kafka_partition, r.kafka_offset, r.rule, r.reason) for r in refusals],
        schema=REFUSALS_SCHEMA,
        orient="row",
    )


def _copy(cursor: psycopg2.extensions.cursor, table: str, frame: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.with_columns(
        [
            pl.col(name).dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%d %H:%M:%S%.6f+00")
            for name, dtype in frame.schema.items()
            if isinstance(dtype, pl.Datetime)
        ]
    ).write_csv(buffer, include_header=False)
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} FROM STDIN WITH (FORMAT csv)", buffer)


def _copy_isolating(
    cursor: psycopg2.extensions.cursor, history: pl.DataFrame, refusals: list[Refusal]
) -> None:
    """COPY `history` into staging_history; a part Postgres refuses is rolled back to its
    savepoint and halved until the refused rows stand alone (a few COPYs per bad row;
    one statement and a savepoint when every row is fine)."""
    cursor.execute("SAVEPOINT staging_copy")
    try:
        _copy(cursor, "staging_history", history)
    except (psycopg2.DataError, psycopg2.IntegrityError) as exc:
        cursor.execute("ROLLBACK TO SAVEPOINT staging_copy")
        cursor.execute("RELEASE SAVEPOINT staging_copy")
        if history.height > 1:
            half = history.height // 2
            _copy_isolating(cursor, history.slice(0, half), refusals)
            _copy_isolating(cursor, history.slice(half), refusals)
            return
        row = history.row(0, named=True)
        refusals.append(
            Refusal(
                row["kafka_partition"],
                row["kafka_offset"],
                REFUSED_RULE,
                f"Postgres refuses this row: {first_line(exc)}",
            )
        )
        if sum(r.rule == REFUSED_RULE for r in refusals) > MAX_REFUSED_ROWS:
            raise ServingRefusedError(
                f"Postgres refuses more than {MAX_REFUSED_ROWS} rows of this batch (the last: "
                f"{first_line(exc)}); the batch is held: check the serving schema and its "
                "constraints against docs/serving.md"
            ) from None
        return
    cursor.execute("RELEASE SAVEPOINT staging_copy")


#: Customers whose balance *could* leave DECIMAL(12,2) in this batch: |balance| plus the
#: sum of |amounts| passes the limit. A bound, not the answer (a hash aggregate, no sort):
#: only these customers' rows are then judged exactly, in Kafka order (balance_overflow.py).
_CUSTOMERS_NEAR_THE_LIMIT = """
SELECT s.customer_id
FROM staging_history s LEFT JOIN customer_balances b USING (customer_id)
GROUP BY s.customer_id, b.current_balance
HAVING abs(coalesce(b.current_balance, 0)) + sum(abs(s.amount_usd)) > %s
"""


def _refuse_overflows(cursor: psycopg2.extensions.cursor) -> list[Refusal]:
    cursor.execute(_CUSTOMERS_NEAR_THE_LIMIT, (MONEY_MAX,))
    customers = [c for (c,) in cursor.fetchall()]
    if not customers:
        return []
    cursor.execute(
        "SELECT customer_id, current_balance FROM customer_balances "
        "WHERE customer_id = ANY(%s) ORDER BY customer_id FOR UPDATE",
        (customers,),
    )
    balances = {c: Decimal(b) for c, b in cursor.fetchall()}
    # Rows whose transaction is already in the history are not inserted again: they do
    # not move the balance.
    cursor.execute(
        "SELECT s.customer_id, s.kafka_partition, s.kafka_offset, s.amount_usd "
        "FROM staging_history s WHERE s.customer_id = ANY(%s) AND NOT EXISTS ("
        "SELECT 1 FROM transaction_history h WHERE h.transaction_id = s.transaction_id "
        "AND h.created_at = s.created_at)",
        (customers,),
    )
    events = [BalanceEvent(c, p, o, Decimal(a)) for c, p, o, a in cursor.fetchall()]
    return overflowing_events(balances, events)


#: History first, then the balances from exactly the rows that went in.
_INSERT_HISTORY_AND_BALANCES = """
WITH inserted AS (
    -- In key order: two lanes inserting the same transactions (a customer whose events
    -- span lanes) wait for each other in one order instead of deadlocking.
    INSERT INTO transaction_history SELECT * FROM staging_history ORDER BY transaction_id
    ON CONFLICT DO NOTHING
    RETURNING customer_id, amount_usd
), deltas AS (
    SELECT customer_id, sum(amount_usd) AS delta, count(*) AS events
    FROM inserted GROUP BY customer_id
), upserted AS (
    INSERT INTO customer_balances
        (customer_id, current_balance, currency, last_updated, version)
    SELECT customer_id, delta, %s, NOW(), 1 FROM deltas ORDER BY customer_id
    ON CONFLICT (customer_id) DO UPDATE SET
        current_balance = customer_balances.current_balance + EXCLUDED.current_balance,
        last_updated = EXCLUDED.last_updated,
        version = customer_balances.version + 1
    RETURNING 1
)
SELECT (SELECT coalesce(sum(events), 0) FROM deltas),
       (SELECT count(*) FROM upserted),
       (SELECT coalesce(sum(delta), 0)::text FROM deltas)
"""


def _insert_history_and_balances(
    cursor: psycopg2.extensions.cursor, fresh: pl.DataFrame, clock: PhaseClock
) -> tuple[int, int, str]:
    """(history rows inserted, customers updated, their USD total as text)."""
    if fresh.is_empty():
        return 0, 0, "0"
    cursor.execute(_INSERT_HISTORY_AND_BALANCES, (BALANCE_CURRENCY,))
    inserted, customers, total = cursor.fetchone()
    clock.lap("insert_history_and_balances")
    return int(inserted), int(customers), total
