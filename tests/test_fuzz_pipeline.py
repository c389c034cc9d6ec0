"""The hostile corpus through the real pipeline: every kind of tests/hostile_corpus.py,
interleaved with good synthetic events, produced to a real Kafka topic and ingested by the
sensor and run queue of a real `dagster-daemon` into the lake and Postgres.

The contract limits are set through their environment variables (smaller than the
defaults, so the oversized record still fits under Kafka's own 1 MB limit), which the
daemon and its runs read: settings -> BillingRulesResource -> CleaningContext ->
decode_records."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pytest

from assets.ingest import INGEST_JOB
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.enrichment import load_reference_data
from billing_dagster.rules import ContractLimits
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream

from .conftest import Pipeline
from .hostile_corpus import hostile_corpus
from .lake_rows import balances, balances_not_matching_history, expected_balances
from .test_operations import operated, positions, wait_until_caught_up

__all__ = ["operated"]  # the fixture, used by name

LIMITS = ContractLimits(
    max_event_id_length=64, max_metadata_bytes=4096, max_record_bytes=256 * 1024
)


@pytest.fixture(autouse=True)
def contract_limits(monkeypatch: pytest.MonkeyPatch) -> ContractLimits:
    """Autouse, so set before `operated` starts the daemon, which inherits them."""
    monkeypatch.setenv("BILLING_MAX_EVENT_ID_LENGTH", str(LIMITS.max_event_id_length))
    monkeypatch.setenv("BILLING_MAX_METADATA_BYTES", str(LIMITS.max_metadata_bytes))
    monkeypatch.setenv("BILLING_MAX_RECORD_BYTES", str(LIMITS.max_record_bytes))
    return LIMITS


def _interleaved(good: list[GeneratedRecord], bad: list[GeneratedRecord]) -> list:
    mixed = []
    for index, record in enumerate(good):
        mixed.append(record)
        if index % 2 == 1 and index // 2 < len(bad):
            mixed.append(bad[index // 2])
    return mixed + bad[len(good) // 2 :]


@pytest.mark.timeout(600)
def test_hostile_records_are_quarantined_and_good_events_reach_the_balances(
    operated: Pipeline, monkeypatch: pytest.MonkeyPatch
):
    pipeline = operated
    corpus = hostile_corpus(datetime.now(UTC), LIMITS)
    good = list(SyntheticBillingStream(seed=43, invalid_rate=0).records(2 * len(corpus)))
    produced = _interleaved(good, [h.record() for h in corpus])
    assert len(produced) == len(good) + len(corpus)
    pipeline.produce(produced)

    status = wait_until_caught_up(pipeline, timeout_s=300)
    assert sum(p["end"] for p in status["partitions"]) == len(produced)
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", pipeline.env["DAGSTER_POSTGRES_URL"])
    with dg.DagsterInstance.from_config(pipeline.env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name=INGEST_JOB))
        assert runs
        assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}

    # Each hostile record once in quarantine, with its rule, a reason and its bytes.
    quarantine = read_table(pipeline.lake, QUARANTINE_TABLE)
    assert quarantine.height == len(corpus)
    found = {row["kafka_key"]: row for row in quarantine.iter_rows(named=True)}
    for hostile in corpus:
        row = found[hostile.record().key]
        assert hostile.rule in row["rules"], (hostile.kind, row["rules"], row["reason"])
        assert row["reason"] and len(row["reason"]) < 1000
        assert row["raw_value"] == hostile.value

    # Every good event accepted once, its money in the balances to the cent.
    events = read_table(pipeline.lake, BILLING_EVENTS_TABLE)
    accepted = {r.event.event_id for r in produced if r.event is not None}
    assert events.height == events["event_id"].n_unique() == len(accepted)
    assert set(events["event_id"]) == accepted
    url = pipeline.settings.postgres_url
    assert balances(url) == expected_balances(produced, load_reference_data(pipeline.lake))
    assert balances_not_matching_history(url) == []
    # And every offset is accounted for: decoded (raw/) or quarantined before that.
    raw = read_table(pipeline.lake, RAW_TABLE)
    assert positions(raw) | positions(quarantine) == {
        (p["partition"], o) for p in status["partitions"] for o in range(p["end"])
    }
