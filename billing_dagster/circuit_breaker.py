"""The ingest circuit breaker: a batch in which one rule rejects too much is held, not
committed.

Quarantine is for records that are bad one by one. When one rule rejects a large share of
a batch, the cause is almost always upstream of the records: an FX day not loaded yet
(`reference:fx_rate`), a topic configured with the wrong encoding in
BILLING_TOPIC_FORMATS (`avro_framing`, `json`), a customer table not refreshed. Sending
the batch to quarantine would move a day of money out of the balances while the run
succeeds. Holding it instead keeps every store as it was; the run fails with what tripped
and what to do, retrying cannot help, and once the cause is fixed the sensor requests the
same offsets again. An operator who decides the records really are bad releases the batch
(run tag `billing/circuit-breaker: release`, `billing-dagster release-batch RUN_ID`).

Pure functions over a batch's quarantine frame: no Dagster, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import polars as pl

#: Run tag: "held" on a run the breaker stopped, "release" on a run that must not stop.
BREAKER_TAG = "billing/circuit-breaker"
HELD = "held"
RELEASE = "release"
#: Run tag on a held run: the rule that tripped it, its share and count (UI, alert).
BREAKER_RULE_TAG = "billing/circuit-breaker-rule"
#: Run tag on a release run (and its backfill): the held run it releases.
RELEASED_RUN_TAG = "billing/circuit-breaker-released-run"

#: Never trip it. A `duplicate:conflict` is judged against events accepted earlier and a
#: `decision:rejected_earlier` repeats a decision already committed: holding the batch
#: cannot change either, and nothing upstream of the batch (reference data, settings)
#: fixes them.
EXEMPT_RULES = frozenset({"duplicate:conflict", "decision:rejected_earlier"})

DEFAULT_PERCENT = Decimal(5)
DEFAULT_MIN_RECORDS = 20
_SAMPLE_CHARS = 200
RUNBOOK = "docs/runbooks/ingest-circuit-breaker.md"


@dataclass(frozen=True)
class BreakerPolicy:
    """Hold a batch when one rule fails more than `percent` % of its records and at least
    `min_records` of them (so 1 bad record of 3 does not hold anything)."""

    percent: Decimal = DEFAULT_PERCENT
    min_records: int = DEFAULT_MIN_RECORDS
    #: The operator released this batch: judge it, never hold it.
    released: bool = False


@dataclass(frozen=True)
class RuleCount:
    rule: str
    #: Records (not rows of rules) that broke the rule; a record breaking two rules counts
    #: for each.
    records: int
    stage: str
    sample_reason: str

    def share(self, total: int) -> Decimal:
        """Percent of `total`, one decimal."""
        if not total:
            return Decimal(0)
        return (Decimal(self.records) * 100 / Decimal(total)).quantize(Decimal("0.1"))


@dataclass(frozen=True)
class BreakerVerdict:
    #: Records of the batch the breaker judged (those no earlier attempt decided).
    records: int
    #: Rules over the threshold, worst first; empty when the batch may be committed.
    tripped: tuple[RuleCount, ...]
    policy: BreakerPolicy

    @property
    def holds(self) -> bool:
        return bool(self.tripped) and not self.policy.released

    def summary(self) -> str:
        """One line per tripped rule, for a run tag and the alert."""
        return ", ".join(
            f"{c.rule} {c.share(self.records)}% ({c.records} of {self.records} records)"
            for c in self.tripped
        )

    def message(self, run_id: str) -> str:
        worst = self.tripped[0]
        rules = "; ".join(
            f"rule {c.rule} rejected {c.records} of {self.records} records "
            f"({c.share(self.records)}%)"
            for c in self.tripped
        )
        return (
            f"circuit breaker open, batch held: {rules} (threshold: more than "
            f"{self.policy.percent}% and at least {self.policy.min_records} records), e.g. "
            f"'{worst.sample_reason}'. Nothing of the batch was committed (raw/, "
            "billing_events/, quarantine/, Postgres). What to do: "
            f"{advice(worst.rule, worst.stage)}; the sensor then requests these offsets "
            "again with the next records (or re-execute this run). If the records really "
            f"are bad, release the batch: `billing-dagster release-batch {run_id}` (its "
            "rejects go to quarantine). Runbook: " + RUNBOOK
        )


class CircuitBreakerOpenError(RuntimeError):
    """A batch was held: nothing of it is committed. Retrying cannot fix it."""

    def __init__(self, verdict: BreakerVerdict, run_id: str) -> None:
        super().__init__(verdict.message(run_id))
        self.verdict = verdict


_FORMAT_STAGES = ("decode", "schema", "cdc")
_ADVICE = {
    "reference:fx_rate": (
        "load the missing day's FX rates into reference/fx_rates "
        "(`billing-dagster reference load`, with an FX file that has the day)"
    ),
    "reference:customer": (
        "load the missing customers into reference/customers (`billing-dagster reference load`)"
    ),
    "reference:subscription": (
        "load the missing subscriptions into reference/subscriptions "
        "(`billing-dagster reference load`)"
    ),
    "currency:supported": "add the currency to BILLING_SUPPORTED_CURRENCIES if it is real",
    "time:future": "check the producers' clocks (and BILLING_MAX_FUTURE_SKEW_SECONDS)",
}


def advice(rule: str, stage: str) -> str:
    """What usually fixes a rule that rejects a whole batch."""
    if rule in _ADVICE:
        return _ADVICE[rule]
    if stage in _FORMAT_STAGES:
        return (
            "check the topic's encoding in BILLING_TOPIC_FORMATS (json, avro or "
            "debezium-json), the Schema Registry, and what the producer writes"
        )
    return "find what changed in the producer: the sample reason says what the records break"


def rule_counts(quarantine: pl.DataFrame) -> list[RuleCount]:
    """Failing records per rule over the quarantine rows of every stage, worst first;
    exempt rules left out."""
    if quarantine.is_empty():
        return []
    per_rule = (
        quarantine.select("stage", "rules", "reason")
        .with_row_index("_record")
        .explode("rules")
        .filter(pl.col("rules").is_not_null() & ~pl.col("rules").is_in(sorted(EXEMPT_RULES)))
        .group_by("rules", maintain_order=True)
        .agg(
            pl.col("_record").n_unique().alias("records"),
            pl.col("stage").first(),
            pl.col("reason").first(),
        )
        .sort(["records", "rules"], descending=[True, False])
    )
    return [
        RuleCount(rule, int(records), stage or "", _sample(reason))
        for rule, records, stage, reason in per_rule.iter_rows()
    ]


def _sample(reason: str | None) -> str:
    text = (reason or "").replace("\n", " ").strip()
    return text if len(text) <= _SAMPLE_CHARS else text[: _SAMPLE_CHARS - 1] + "…"


def judge(quarantine: pl.DataFrame, records: int, policy: BreakerPolicy) -> BreakerVerdict:
    """The rules failing more than `policy.percent` % of `records` and at least
    `policy.min_records` records."""
    tripped = tuple(
        count
        for count in rule_counts(quarantine)
        if count.records >= policy.min_records
        and Decimal(count.records) * 100 > policy.percent * records
    )
    return BreakerVerdict(records=records, tripped=tripped, policy=policy)


def undecided(
    frame: pl.DataFrame, decided: Mapping[int, int | None], *, prefix: str = "kafka_"
) -> pl.DataFrame:
    """Rows at offsets no earlier attempt decided (billing_events' marks, `decided`).

    A retry after billing_events committed keeps that decision whatever the breaker says
    now (docs/architecture.md): the attempt that made it was judged, or released, then."""
    marks = {p: m for p, m in decided.items() if m is not None}
    if not marks or frame.is_empty():
        return frame
    partition, offset = pl.col(f"{prefix}partition"), pl.col(f"{prefix}offset")
    mark = partition.replace_strict(marks, default=None, return_dtype=pl.Int64)
    return frame.filter(mark.is_null() | (offset >= mark))


def check_batch(
    policy: BreakerPolicy,
    quarantine: pl.DataFrame,
    records: pl.DataFrame,
    decided: Mapping[int, int | None],
    *,
    run_id: str,
) -> BreakerVerdict:
    """Judge a batch after it is decided and before anything is committed; raises
    CircuitBreakerOpenError when it must be held (and was not released)."""
    verdict = judge(undecided(quarantine, decided), undecided(records, decided).height, policy)
    if verdict.holds:
        raise CircuitBreakerOpenError(verdict, run_id)
    return verdict


# ---- held batches, for the alert ---------------------------------------------------------


@dataclass(frozen=True)
class IngestRunOutcome:
    run_id: str
    succeeded: bool
    #: The BREAKER_RULE_TAG of a held run, None for any other run.
    held: str | None


def open_holds(runs_newest_first: Sequence[IngestRunOutcome]) -> dict[str, str]:
    """Held ingest runs with no successful ingest run after them: run id -> what tripped.

    A later success (the re-requested batch once the cause was fixed, or a release) means
    the lake moved past the held offsets."""
    held: dict[str, str] = {}
    for run in runs_newest_first:
        if run.succeeded:
            break
        if run.held is not None:
            held[run.run_id] = run.held
    return held
