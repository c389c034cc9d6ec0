"""A topic deleted and created again under the same name is refused until an operator
adopts it, then processed as a new generation: its records exactly once, the old topic's
rows and balances untouched (real Kafka, Delta and Postgres)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from click.testing import CliRunner

from assets.ingest import INGEST_OP
from billing_dagster.cli import main
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.kafka_io import kafka_topic_of
from billing_dagster.offsets import hour_key
from billing_dagster.operations import OperationError
from billing_dagster.postgres_db import connect
from billing_dagster.synthetic import SyntheticBillingStream
from billing_dagster.topic_identity import (
    TopicRecreatedError,
    check_key,
    current_generation,
    plan_adoption,
    record_generation,
    resolve_generation,
)

from .conftest import Pipeline
from .lake_rows import balances, balances_not_matching_history, expected_balances
from .test_ingest_kafka import evaluate_sensor, generated, lake_rows, materialize, recreate_topic

TABLES = (RAW_TABLE, BILLING_EVENTS_TABLE, QUARANTINE_TABLE)


def test_generations_are_recorded_once_checked_and_adopted(tmp_path: Path):
    lake = LakeLocation(str(tmp_path / "lake"))
    # Read-only callers do not record; the first recording caller does.
    assert resolve_generation(lake, "t", "id-a", record=False).key == "t"
    assert current_generation(lake, "t") is None
    assert resolve_generation(lake, "t", "id-a").generation == 0
    assert resolve_generation(lake, "t", "id-a").topic_id == "id-a"
    with pytest.raises(TopicRecreatedError, match="billing-dagster topic adopt --topic t"):
        resolve_generation(lake, "t", "id-b")
    with pytest.raises(OperationError, match="nothing to adopt"):
        plan_adoption(lake, "t", "id-a", reason="same topic")

    previous, new = plan_adoption(lake, "t", "id-b", reason="recreated by ops", by="me")
    assert (previous.key, new.key, new.generation) == ("t", "t@1", 1)
    assert current_generation(lake, "t").key == "t"  # planned, not yet recorded
    assert record_generation(lake, new)
    # A second writer of the same generation number loses, whatever it holds.
    assert not record_generation(lake, new)
    assert resolve_generation(lake, "t", "id-b").key == "t@1"
    assert kafka_topic_of("t@1") == "t"
    assert check_key(lake, "t@1", "id-b").reason == "recreated by ops"
    # A run planned for the old generation is refused, not run against the new topic.
    with pytest.raises(TopicRecreatedError, match="planned for 't'"):
        check_key(lake, "t", "id-b")


def cli(pipeline: Pipeline, *args: str):
    return CliRunner().invoke(main, list(args), env=pipeline.env, catch_exceptions=False)


def offsets_request(topic: str, starts: dict[int, int], ends: dict[int, int]) -> dg.RunRequest:
    """A run as the sensor planned it before the topic was recreated."""
    ranges = [
        {"partition": p, "start": starts[p], "end": ends[p]} for p in ends if ends[p] > starts[p]
    ]
    return dg.RunRequest(
        partition_key=hour_key(datetime.now(UTC)),
        run_config={"ops": {INGEST_OP: {"config": {"topic": topic, "ranges": ranges}}}},
    )


def failure_text(result) -> str:
    (failure,) = result.get_step_failure_events()
    return str(failure.event_specific_data.error)


def topic_ids(url: str) -> dict[str, str]:
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT topic_key, topic_id FROM topic_identity")
        return dict(cursor.fetchall())


def test_recreated_topic_grown_past_the_old_marks_is_refused_then_adopted(
    pipeline: Pipeline, kafka
):
    instance = dg.DagsterInstance.ephemeral()
    topic, url = pipeline.settings.topic, pipeline.settings.postgres_url
    first = generated(seed=31, count=150)
    pipeline.produce(first)
    requests, cursor, _ = evaluate_sensor(pipeline, instance, None)
    assert all(materialize(pipeline, r, instance).success for r in requests)
    with pipeline.client() as client:
        old_ends = client.end_offsets(topic)
    before = {name: lake_rows(pipeline, name) for name in TABLES}
    old_balances = balances(url)

    recreate_topic(kafka.bootstrap_servers, topic)
    second = generated(seed=32, count=1_200)
    pipeline.produce(second)
    with pipeline.client() as client:
        new_ends = client.end_offsets(topic)
    # Every partition grew past the old marks: the offset heuristic alone sees nothing.
    assert all(new_ends[p] >= old_ends[p] for p in old_ends)

    requests, _, skip = evaluate_sensor(pipeline, instance, cursor)
    assert requests == []
    assert "recreated" in skip.skip_message
    assert f"billing-dagster topic adopt --topic {topic}" in skip.skip_message
    # A run planned for the old topic, and an hour launched from the UI: both refused at
    # once with the same message, no retry, nothing written.
    stale = materialize(pipeline, offsets_request(topic, old_ends, new_ends), instance)
    ui = dg.materialize(
        [pipeline.asset],
        partition_key=hour_key(datetime.now(UTC)),
        resources=pipeline.resources,
        instance=instance,
        raise_on_error=False,
    )
    for refused in (stale, ui):
        assert not refused.success
        assert "topic adopt" in failure_text(refused)
        assert "STEP_UP_FOR_RETRY" not in [e.event_type_value for e in refused.all_events]
    for name in TABLES:
        assert lake_rows(pipeline, name).equals(before[name]), name
    assert balances(url) == old_balances
    status = json.loads(cli(pipeline, "status", "--json").output)
    assert "recreated" in status["topic_recreated"]

    adopted = cli(pipeline, "topic", "adopt", "--reason", "recreated by the platform team")
    assert adopted.exit_code == 0, adopted.output
    assert f"'{topic}@1'" in adopted.output
    again = cli(pipeline, "topic", "adopt", "--reason", "twice")
    assert again.exit_code == 2 and "nothing to adopt" in again.output

    requests, cursor, _ = evaluate_sensor(pipeline, instance, cursor)
    assert requests and all(materialize(pipeline, r, instance).success for r in requests)
    # Exactly once: a second tick finds nothing to request.
    assert evaluate_sensor(pipeline, instance, cursor)[0] == []

    key = f"{topic}@1"
    raw, events, quarantine = (lake_rows(pipeline, name) for name in TABLES)
    for name, frame in zip(TABLES, (raw, events, quarantine), strict=True):
        old = frame.filter(pl.col("kafka_topic") == topic)
        assert old.sort(old.columns).equals(before[name].sort(before[name].columns)), name
        assert set(frame["kafka_topic"].unique()) <= {topic, key}
    new_raw = raw.filter(pl.col("kafka_topic") == key)
    new_quarantine = quarantine.filter(pl.col("kafka_topic") == key)
    # Every offset of the new topic once: a delivery in raw/ or a reject in quarantine.
    positions = pl.concat(
        [f.select("kafka_partition", "kafka_offset") for f in (new_raw, new_quarantine)]
    )
    assert positions.height == positions.n_unique() == sum(new_ends.values()) == len(second)
    assert set(events.filter(pl.col("kafka_topic") == key)["event_id"]) == {
        r.event.event_id for r in second if r.kind == "valid"
    }
    reference = SyntheticBillingStream().reference_data()
    assert balances(url) == expected_balances(first + second, reference)
    assert balances_not_matching_history(url) == []
    ids = topic_ids(url)
    assert set(ids) == {topic, key} and ids[topic] != ids[key]

    status = json.loads(cli(pipeline, "status", "--json").output)
    assert (status["topic"], status["topic_recreated"], status["lag"]) == (key, None, 0)
