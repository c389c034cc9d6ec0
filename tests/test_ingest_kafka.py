"""The first slice against real Apache Kafka (KRaft) and real Delta tables."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from assets.ingest import INGEST_OP
from billing_dagster.contract import QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.kafka_io import KafkaClient, ensure_topic
from billing_dagster.offsets import TopicResetError, hour_key
from billing_dagster.synthetic import SyntheticBillingStream
from resources import KafkaResource

from .conftest import Pipeline


def evaluate_sensor(pipeline: Pipeline, instance: dg.DagsterInstance, cursor: str | None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=pipeline.resources
    )
    result = pipeline.sensor(context)
    if isinstance(result, dg.SkipReason):
        return [], context.cursor, result
    return list(result.run_requests), result.cursor, None


def materialize(pipeline: Pipeline, request: dg.RunRequest, instance, resources=None):
    return dg.materialize(
        [pipeline.asset],
        partition_key=request.partition_key,
        run_config=request.run_config,
        resources=resources or pipeline.resources,
        instance=instance,
        raise_on_error=False,
    )


def materialization(result, asset: str) -> dg.AssetMaterialization:
    (found,) = [
        m
        for m in result.asset_materializations_for_node(INGEST_OP)
        if m.asset_key == dg.AssetKey(asset)
    ]
    return found


def generated(seed: int, count: int):
    stream = SyntheticBillingStream(seed=seed, invalid_rate=0.02, duplicate_rate=0.03)
    return list(stream.records(count))


def lake_rows(pipeline: Pipeline, name: str = RAW_TABLE) -> pl.DataFrame:
    return read_table(pipeline.lake, name)


def test_empty_topic_requests_no_run(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    requests, cursor, skip = evaluate_sensor(pipeline, instance, None)
    assert requests == [] and skip is not None
    again, _, _ = evaluate_sensor(pipeline, instance, cursor)
    assert again == []


def test_new_events_flow_to_delta_exactly_once_with_exact_money(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    records = generated(seed=11, count=3_000)
    pipeline.produce(records)
    kinds = Counter(r.kind for r in records)

    requests, cursor, _ = evaluate_sensor(pipeline, instance, None)
    assert len(requests) == 1
    assert requests[0].partition_key == hour_key(datetime.now(UTC))
    ranges = requests[0].run_config["ops"][INGEST_OP]["config"]["ranges"]
    with pipeline.client() as client:
        ends = client.end_offsets(pipeline.settings.topic)
    assert {(r["partition"], r["start"], r["end"]) for r in ranges} == {
        (p, 0, e) for p, e in ends.items() if e > 0
    }
    assert json.loads(cursor)["offsets"] == {str(p): e for p, e in ends.items()}

    result = materialize(pipeline, requests[0], instance)
    assert result.success
    raw = lake_rows(pipeline)
    quarantine = lake_rows(pipeline, QUARANTINE_TABLE)
    # Raw keeps every delivery (duplicates are issue #3's to remove), each offset once.
    assert raw.height == kinds["valid"] + kinds["duplicate"]
    assert quarantine.height == kinds["invalid"]
    assert raw.select("kafka_partition", "kafka_offset").n_unique() == raw.height
    assert raw.schema["amount"] == pl.Decimal(12, 2)
    expected = Counter((r.event.event_id, r.event.amount) for r in records if r.event)
    assert Counter(zip(raw["event_id"], raw["amount"], strict=True)) == expected
    assert raw["amount"].sum() == sum((r.event.amount for r in records if r.event), Decimal("0.00"))
    assert set(quarantine["raw_value"].to_list()) <= {
        r.value for r in records if r.kind == "invalid"
    }
    assert quarantine["reason"].null_count() == 0

    metadata = materialization(result, "raw_billing_events").metadata
    assert metadata["records_read"].value == len(records)
    assert metadata["rows_written"].value + quarantine.height == len(records)
    assert metadata["offset_ranges_read"].value == " ".join(
        f"{r['partition']}:{r['start']}-{r['end']}"
        for r in sorted(ranges, key=lambda r: r["partition"])
    )

    # Processed offsets are visible to ordinary Kafka tools through the consumer group.
    with pipeline.client() as client:
        committed = client.committed(pipeline.settings.topic)
    assert {p: o for p, o in committed.items() if o is not None} == {
        p: e for p, e in ends.items() if e > 0
    }

    # Nothing new: the next tick asks for nothing.
    again, _, skip = evaluate_sensor(pipeline, instance, cursor)
    assert again == [] and skip is not None


def test_rerunning_the_same_range_adds_nothing(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    pipeline.produce(generated(seed=12, count=1_000))
    (request,), _, _ = evaluate_sensor(pipeline, instance, None)
    assert materialize(pipeline, request, instance).success
    before = lake_rows(pipeline).sort("kafka_partition", "kafka_offset")
    quarantine_before = lake_rows(pipeline, QUARANTINE_TABLE).height

    rerun = materialize(pipeline, request, instance)
    assert rerun.success
    assert lake_rows(pipeline).sort("kafka_partition", "kafka_offset").equals(before)
    assert lake_rows(pipeline, QUARANTINE_TABLE).height == quarantine_before
    metadata = materialization(rerun, "raw_billing_events").metadata
    assert metadata["records_read"].value == 0
    assert metadata["requested_ranges_already_committed"].value == len(
        request.run_config["ops"][INGEST_OP]["config"]["ranges"]
    )


class CrashAfterLakeWrite(KafkaResource):
    """A Kafka resource whose offset commit dies once: the lake already holds the batch,
    exactly the moment a crash would leave the lake ahead of Kafka and the sensor."""

    def client(self) -> KafkaClient:
        client = super().client()
        real_commit = client.commit

        def commit_then_crash(topic, offsets):
            marker = CRASHES.get(topic, 0)
            CRASHES[topic] = marker + 1
            if marker == 0:
                raise ConnectionError("process killed after the Delta commit")
            real_commit(topic, offsets)

        client.commit = commit_then_crash
        return client


CRASHES: dict[str, int] = {}


def test_run_failing_after_the_write_is_retried_and_adds_nothing(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    records = generated(seed=13, count=2_000)
    pipeline.produce(records)
    (request,), _, _ = evaluate_sensor(pipeline, instance, None)
    crashing_kafka = CrashAfterLakeWrite(
        bootstrap_servers=pipeline.settings.kafka_bootstrap_servers,
        topic=pipeline.settings.topic,
        consumer_group=pipeline.settings.consumer_group,
    )
    crashing = {**pipeline.resources, "kafka": crashing_kafka}
    result = materialize(pipeline, request, instance, resources=crashing)
    # The first attempt wrote and crashed; the step's retry found the offsets committed.
    assert result.success
    assert CRASHES[pipeline.settings.topic] == 2
    step_events = [e.event_type_value for e in result.all_events]
    assert "STEP_UP_FOR_RETRY" in step_events
    raw = lake_rows(pipeline)
    valid = sum(1 for r in records if r.kind != "invalid")
    assert raw.height == valid
    assert raw.select("kafka_partition", "kafka_offset").n_unique() == valid
    assert lake_rows(pipeline, QUARANTINE_TABLE).height == len(records) - valid

    # And a whole new run of the same range, as a UI re-execution would do, adds nothing.
    assert materialize(pipeline, request, instance).success
    assert lake_rows(pipeline).height == valid


def _ranges(request: dg.RunRequest) -> dict[int, tuple[int, int]]:
    config = request.run_config["ops"][INGEST_OP]["config"]
    return {r["partition"]: (r["start"], r["end"]) for r in config["ranges"]}


def test_sensor_rerequests_offsets_whose_run_never_committed(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    pipeline.produce(generated(seed=14, count=600))
    (first,), cursor, _ = evaluate_sensor(pipeline, instance, None)
    pipeline.produce(generated(seed=15, count=600))
    # The first run never ran and none is queued: the next tick asks again from the lake.
    (second,), _, _ = evaluate_sensor(pipeline, instance, cursor)
    assert all(start == 0 for start, _ in _ranges(second).values())
    assert set(_ranges(first)) <= set(_ranges(second))


def test_a_later_run_covers_offsets_an_earlier_failed_run_left_behind(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    first_records = generated(seed=16, count=600)
    pipeline.produce(first_records)
    (first,), _cursor, _ = evaluate_sensor(pipeline, instance, None)
    second_records = generated(seed=17, count=600)
    pipeline.produce(second_records)
    with pipeline.client() as client:
        ends = client.end_offsets(pipeline.settings.topic)
    done = _ranges(first)
    # Every partition from where the first run would have ended (possibly empty ranges).
    later = [
        {"partition": p, "start": done.get(p, (0, 0))[1], "end": end}
        for p, end in ends.items()
        if end > 0
    ]
    second = dg.RunRequest(
        partition_key=first.partition_key,
        run_config={"ops": {INGEST_OP: {"config": {"ranges": later}}}},
    )
    # The first run failed for good; the second run starts where the lake stopped.
    result = materialize(pipeline, second, instance)
    assert result.success
    valid = sum(1 for r in first_records + second_records if r.kind != "invalid")
    assert lake_rows(pipeline).height == valid
    metadata = materialization(result, "raw_billing_events").metadata
    assert {p for p, _, _ in json.loads(metadata["gaps_covered"].value)} == set(done)
    # The first run, arriving late, is a no-op.
    assert materialize(pipeline, first, instance).success
    assert lake_rows(pipeline).height == valid


def test_materializing_an_hour_from_the_ui_takes_that_hours_offsets(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    records = generated(seed=19, count=500)
    pipeline.produce(records)
    hour = hour_key(datetime.now(UTC))
    result = dg.materialize(
        [pipeline.asset], partition_key=hour, resources=pipeline.resources, instance=instance
    )
    assert result.success
    assert lake_rows(pipeline).height == sum(1 for r in records if r.kind != "invalid")
    # The sensor then sees those offsets as already done in the lake.
    requests, _, _ = evaluate_sensor(pipeline, instance, None)
    assert requests == []


def recreate_topic(bootstrap_servers: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    admin.delete_topics([topic])[topic].result(timeout=30)
    deadline = time.monotonic() + 60
    while True:  # deletion completes asynchronously; creation fails until it has
        try:
            if ensure_topic(bootstrap_servers, topic, partitions=24):
                return
        except KafkaException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not recreate {topic}")
        time.sleep(0.5)


def test_recreated_topic_behind_the_lake_is_refused(pipeline: Pipeline, kafka):
    instance = dg.DagsterInstance.ephemeral()
    pipeline.produce(generated(seed=20, count=300))
    (request,), _, _ = evaluate_sensor(pipeline, instance, None)
    assert materialize(pipeline, request, instance).success

    recreate_topic(kafka.bootstrap_servers, pipeline.settings.topic)
    pipeline.produce(generated(seed=21, count=50))
    # New records at old offsets would look processed: the sensor and the run both refuse.
    with pytest.raises(TopicResetError, match="recreated"):
        evaluate_sensor(pipeline, instance, None)
    rerun = materialize(pipeline, request, instance)
    assert not rerun.success
    assert "recreated" in str(rerun.get_step_failure_events()[0].event_specific_data.error)
    # Retrying cannot fix a recreated topic, so the step fails at once.
    assert "STEP_UP_FOR_RETRY" not in [e.event_type_value for e in rerun.all_events]


def test_s3_lake_on_moto_gets_the_same_exactly_once_rows(s3_pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    records = generated(seed=18, count=1_500)
    s3_pipeline.produce(records)
    (request,), _, _ = evaluate_sensor(s3_pipeline, instance, None)
    assert materialize(s3_pipeline, request, instance).success
    assert materialize(s3_pipeline, request, instance).success
    raw = lake_rows(s3_pipeline)
    assert s3_pipeline.lake.root.startswith("s3://")
    assert raw.height == sum(1 for r in records if r.kind != "invalid")
    assert raw.select("kafka_partition", "kafka_offset").n_unique() == raw.height
    assert lake_rows(s3_pipeline, QUARANTINE_TABLE).height == sum(
        1 for r in records if r.kind == "invalid"
    )
