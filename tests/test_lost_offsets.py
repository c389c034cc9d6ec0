"""Offsets deleted by retention before processing: the partition waits for an operator,
the others go on, the alerts and status name it, and an acknowledged gap is audited and
skipped exactly (real Kafka with delete_records, Delta and Postgres)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import dagster as dg
from click.testing import CliRunner
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from billing_dagster.alerts import consumer_lag_alert, offsets_lost_alert
from billing_dagster.cli import main
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import committed_offsets
from billing_dagster.lost_offsets import (
    acknowledged_gaps,
    lost_offsets,
    read_retained,
    without_lost,
)
from billing_dagster.offsets import OffsetRange, ReadPlan
from billing_dagster.operations import partition_status
from billing_dagster.serving import serving_marks
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream
from sensors.alerts import evaluate_alerts

from .conftest import Pipeline
from .lake_rows import balances, balances_not_matching_history, expected_balances
from .test_ingest_kafka import (
    evaluate_sensor,
    materialization,
    materialize,
    produce_at,
    request_ranges,
)
from .test_topic_identity import offsets_request


def test_lost_offsets_are_found_left_out_and_reported():
    assert lost_offsets({0: 5, 1: 10, 2: None, 3: 2}, {0: 7, 1: 3, 2: 9, 3: 2}) == {0: (5, 7)}
    plan = ReadPlan(
        reads=(OffsetRange(0, 5, 20), OffsetRange(1, 10, 12)),
        already_committed=(),
        gaps_covered=(OffsetRange(0, 4, 5),),
    )
    kept = without_lost(plan, {0: 7, 1: 3})
    assert kept.reads == (OffsetRange(1, 10, 12),)
    assert (kept.gaps_covered, kept.lost) == ((), (OffsetRange(0, 5, 7),))
    assert without_lost(plan, {0: 5, 1: 10}) is plan

    alert = offsets_lost_alert({3: (100, 250)}, topic="t")
    assert alert.firing and "150 offsets" in alert.summary and "3:100-250" in alert.summary
    assert not offsets_lost_alert({}, topic="t").firing
    lag = consumer_lag_alert({0: 5}, 10, lost={3: (100, 250)}, acknowledged_gaps=40)
    assert not lag.firing
    assert "150 offsets lost" in lag.summary and "40 lost offsets acknowledged" in lag.summary
    (status,) = partition_status({3: (250, 300)}, {3: 100}, {3: 100})
    assert status.lost == (100, 250)


def payments_only(seed: int, count: int) -> list[GeneratedRecord]:
    """Payments, adjustments and undecodable records: a lost payment then cannot make a
    surviving refund quarantined, so the expectation stays a plain sum."""
    stream = SyntheticBillingStream(seed=seed, invalid_rate=0.02, duplicate_rate=0.03)
    return [
        r
        for r in stream.records(count)
        if r.event is None or r.event.transaction_type.value in ("PAYMENT", "ADJUSTMENT")
    ]


def cli(pipeline: Pipeline, *args: str):
    return CliRunner().invoke(main, list(args), env=pipeline.env, catch_exceptions=False)


def marks(pipeline: Pipeline, table: str, partitions: list[int]) -> dict[int, int | None]:
    return committed_offsets(pipeline.lake.open(table), pipeline.settings.topic, partitions)


def alerts_by_name(pipeline: Pipeline, instance: dg.DagsterInstance) -> dict[str, object]:
    r = pipeline.resources
    found = evaluate_alerts(
        instance, r["kafka"], r["lake"], r["alerting"], r["analytics"], r["postgres"]
    )
    return {a.name: a for a in found}


def test_lost_partition_waits_for_acknowledgement_while_the_others_go_on(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    topic, url = pipeline.settings.topic, pipeline.settings.postgres_url
    now = datetime.now(UTC)
    first = payments_only(41, 480)
    produce_at(pipeline, [(r, now) for r in first])
    requests, cursor, _ = evaluate_sensor(pipeline, instance, None)
    assert all(materialize(pipeline, r, instance).success for r in requests)
    second = payments_only(42, 960)
    landed = produce_at(pipeline, [(r, now) for r in second])
    with pipeline.client() as client:
        ends = client.end_offsets(topic)
    partitions = sorted(ends)
    done = marks(pipeline, RAW_TABLE, partitions)
    # Retention deletes half of the unprocessed records of the busiest partition.
    lost_p = Counter(p for p, _ in landed).most_common(1)[0][0]
    low = (done[lost_p] + ends[lost_p]) // 2
    admin = AdminClient({"bootstrap.servers": pipeline.settings.kafka_bootstrap_servers})
    for future in admin.delete_records([TopicPartition(topic, lost_p, low)]).values():
        future.result(30)

    # The sensor plans every other partition and leaves the lost one out.
    requests, cursor, _ = evaluate_sensor(pipeline, instance, cursor)
    planned = {p for r in requests for p in request_ranges(r)}
    assert planned == {p for p in partitions if ends[p] > done[p]} - {lost_p}
    # A run planned before the loss meets it: it processes the rest and says what it left.
    result = materialize(pipeline, offsets_request(topic, done, ends), instance)
    assert result.success
    metadata = materialization(result, "raw_billing_events").metadata
    assert metadata["offsets_lost"].value == f"{lost_p}:{done[lost_p]}-{low}"
    after = marks(pipeline, RAW_TABLE, partitions)
    assert after == {**ends, lost_p: done[lost_p]}
    # Retention striking during a read: the partition leaves the plan, the rest is read.
    other = next(p for p in partitions if p != lost_p and ends[p] > 0)
    with pipeline.client() as client:
        plan = ReadPlan(
            (OffsetRange(lost_p, done[lost_p], ends[lost_p]), OffsetRange(other, 0, 1)), (), ()
        )
        records, _, read = read_retained(client, topic, plan)
    assert read.lost == (OffsetRange(lost_p, done[lost_p], low),)
    assert records["kafka_partition"].to_list() == [other]

    alerts = alerts_by_name(pipeline, instance)
    assert alerts["offsets_lost"].firing
    assert f"{lost_p}:{done[lost_p]}-{low}" in alerts["offsets_lost"].summary
    status = json.loads(cli(pipeline, "status", "--json").output)
    assert status["lost_offsets"] == low - done[lost_p]
    assert status["partitions"][lost_p]["lost"] == [done[lost_p], low]

    # Acknowledged with a reason: audited, and the marks move past the gap.
    assert cli(pipeline, "topic", "acknowledge-gap", "--partition", str(lost_p)).exit_code == 2
    ack = cli(
        pipeline, "topic", "acknowledge-gap", "--partition", str(lost_p), "--reason", "INC-42"
    )
    assert ack.exit_code == 0, ack.output
    for table in (BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE):
        assert marks(pipeline, table, [lost_p]) == {lost_p: low}, table
    assert serving_marks(url, topic)[lost_p] == low
    (gap,) = acknowledged_gaps(pipeline.lake, topic)
    assert (gap.partition, gap.start, gap.end, gap.reason) == (lost_p, done[lost_p], low, "INC-42")
    again = cli(pipeline, "topic", "acknowledge-gap", "--partition", str(lost_p), "--reason", "x")
    assert again.exit_code == 2 and "no lost offsets" in again.output

    # The partition resumes at the gap's end; every record but the lost ones counts once.
    requests, cursor, _ = evaluate_sensor(pipeline, instance, cursor)
    assert [request_ranges(r) for r in requests] == [{lost_p: (low, ends[lost_p])}]
    assert materialize(pipeline, requests[0], instance).success
    lost = {i for i, (p, o) in enumerate(landed) if p == lost_p and o < low}
    kept = first + [r for i, r in enumerate(second) if i not in lost]
    reference = SyntheticBillingStream().reference_data()
    assert balances(url) == expected_balances(kept, reference)
    assert balances_not_matching_history(url) == []
    alerts = alerts_by_name(pipeline, instance)
    assert not alerts["offsets_lost"].firing
    assert f"{low - done[lost_p]:,} lost offsets acknowledged" in alerts["consumer_lag"].summary
    status = json.loads(cli(pipeline, "status", "--json").output)
    assert (status["lost_offsets"], status["lag"]) == (0, 0)
    assert [g["reason"] for g in status["acknowledged_gaps"]] == ["INC-42"]
    shown = json.loads(cli(pipeline, "topic", "show", "--json").output)
    assert (shown["key"], shown["recreated"], shown["lost"]) == (topic, None, {})
    assert [(g["generation"], g["reason"]) for g in shown["generations"]] == [(0, "first seen")]
    assert [(g["partition"], g["to"]) for g in shown["acknowledged_gaps"]] == [(lost_p, low)]
