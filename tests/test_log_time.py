"""Log hours that mean something: topics the tool creates stamp records with the broker's
clock, and on a CreateTime topic an hour a future-dated record hides is reported with the
way out instead of replaying nothing successfully (real Kafka)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
from click.testing import CliRunner
from confluent_kafka import Producer

from billing_dagster.cli import main
from billing_dagster.kafka_io import LOG_APPEND_TIME, ensure_topic
from billing_dagster.log_time import HiddenRecords, hidden_records
from billing_dagster.offsets import HOUR, OffsetRange, hour_key, hour_start

from .conftest import Pipeline
from .test_ingest_kafka import generated

H = datetime(2024, 12, 15, 10, tzinfo=UTC)
M = timedelta(minutes=1)


def test_hidden_hours_are_those_a_far_dated_record_shadows():
    logs = {
        # Offset 2 is dated 16:00 by its producer; 3-5, at 10:10-11:10, sit behind it.
        0: [H - 50 * M, H - 50 * M, H + 6 * HOUR, H + 10 * M, H + 20 * M, H + 70 * M],
        # A quiet partition: nothing between 09:00 and 13:00, in order.
        1: [H - HOUR] * 7 + [H + 3 * HOUR, H + 3 * HOUR + 5 * M],
        # Ordinary disorder between producers around 11:00.
        2: [H + 30 * M] * 4 + [H + HOUR + timedelta(milliseconds=500), H + HOUR - 1 * M / 60],
    }
    ends = {p: len(log) for p, log in logs.items()}

    def lookup(moment: datetime) -> dict[int, int | None]:
        """Kafka's answer: the first offset dated at or after `moment`."""
        return {
            p: next((o for o, at in enumerate(log) if at >= moment), None)
            for p, log in logs.items()
        }

    asked: list[dict[int, list[int]]] = []

    def timestamps_at(wanted):
        asked.append({p: sorted(o) for p, o in wanted.items()})
        return {
            (p, o): logs[p][o]
            for p, offsets in wanted.items()
            for first in offsets
            for o in (first, first + 1)
            if o < ends[p]
        }

    found = hidden_records([H, H + HOUR, H + 6 * HOUR], lookup, ends, timestamps_at)
    assert [(h.partition_key, h.partition, h.offset) for h in found] == [
        ("2024-12-15-10:00", 0, 2),
        ("2024-12-15-11:00", 0, 2),
    ]
    assert (found[0].timestamp, found[0].next_timestamp) == (H + 6 * HOUR, H + 10 * M)
    assert found[0].range == OffsetRange(0, 2, 6)
    # Records are read only where a boundary is dated well past the hour's end, once each.
    assert asked == [{0: [2], 1: [7]}]


def test_tool_created_topics_take_the_brokers_time(pipeline: Pipeline, kafka):
    name = f"billing-appended-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka.bootstrap_servers, name, partitions=2)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    past = datetime.now(UTC) - timedelta(days=2)
    producer.produce(name, b"v", partition=0, timestamp=int(past.timestamp() * 1000))
    assert producer.flush(30) == 0
    with pipeline.client() as client:
        assert client.timestamp_type(name) == LOG_APPEND_TIME
        records, _ = client.read(name, [OffsetRange(0, 0, 1)])
    # The producer's two-day-old timestamp is replaced by the broker's clock.
    assert records["kafka_timestamp"][0] > datetime.now(UTC) - timedelta(minutes=10)


def produce_on_partition(pipeline: Pipeline, stamped: list[tuple[bytes, datetime]]) -> None:
    """Each value to partition 0 with its CreateTime timestamp, one flush each (own batch)."""
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka_bootstrap_servers})
    for value, at in stamped:
        producer.produce(
            pipeline.settings.topic, value, partition=0, timestamp=int(at.timestamp() * 1000)
        )
        assert producer.flush(30) == 0


def test_an_hour_a_future_dated_record_hides_is_reported_not_replayed_empty(
    pipeline: Pipeline,
):
    now = datetime.now(UTC)
    earlier, hidden = hour_start(now) - 3 * HOUR, hour_start(now) - 2 * HOUR
    values = [r.value for r in generated(seed=61, count=12) if r.kind == "valid"][:7]
    # Kafka 4 refuses timestamps more than an hour ahead by default; 40 minutes is enough.
    future = now + timedelta(minutes=40)
    produce_on_partition(
        pipeline,
        [(v, earlier + 10 * M) for v in values[:3]]
        + [(values[3], future)]
        + [(v, hidden + 10 * M) for v in values[4:]],
    )
    env = pipeline.env
    args = ["replay", "--from", hidden.isoformat(), "--to", (hidden + HOUR).isoformat()]
    refused = CliRunner().invoke(main, [*args, "--dry-run"], env=env)
    assert refused.exit_code == 2
    assert "nothing to replay by hour" in refused.output
    warning = f"log hour {hour_key(hidden)} of {pipeline.settings.topic}/0 may miss records"
    assert warning in refused.output and "offset 3 is dated" in refused.output
    assert "start: 3, end: 7" in refused.output

    # A wider range still plans its good hour, and names the hidden one.
    wider = ["replay", "--from", earlier.isoformat(), "--to", (hidden + HOUR).isoformat()]
    planned = CliRunner().invoke(main, [*wider, "--dry-run", "--json"], env=env)
    assert planned.exit_code == 0, planned.output
    report = json.loads(planned.stdout)
    assert report["records"] == 3
    assert [(h["partition_key"], h["offset"]) for h in report["hidden_records"]] == [
        (hour_key(hidden), 3)
    ]

    # A UI launch (or backfill) of the hidden hour fails with the same words, no retry.
    result = dg.materialize(
        [pipeline.asset],
        partition_key=hour_key(hidden),
        resources=pipeline.resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert warning in str(failure.event_specific_data.error)


def test_hidden_records_describe_the_way_out():
    found = HiddenRecords("2024-12-15-10:00", 3, 120, H + 6 * HOUR, H + 10 * M, 400)
    text = found.describe("billing-events")
    assert "billing-events/3" in text and "offset 120" in text and "end: 400" in text
