"""The first slice against real Apache Kafka (KRaft) and real Delta tables."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import dagster as dg
import polars as pl
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

import assets.ingest
from assets.ingest import INGEST_OP
from billing_dagster.batch_commit import COMMIT_STEPS
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.delta_lake import read_table
from billing_dagster.kafka_io import ensure_topic
from billing_dagster.offsets import HOUR, hour_key, hour_start
from billing_dagster.postgres_db import connect
from billing_dagster.producer import make_producer
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream

from .conftest import Pipeline, pipeline_env
from .lake_rows import balances, balances_not_matching_history, expected_balances, history_counts


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


def fail_once_after(monkeypatch: pytest.MonkeyPatch, failing_step: str) -> list[str]:
    """Make the ingest op raise right after its `failing_step` commit, once (through
    ingest_offsets' on_step hook); returns the steps heard, in order, over every attempt."""
    real = assets.ingest.ingest_offsets
    heard: list[str] = []

    def hook(name: str) -> None:
        heard.append(name)
        if name == failing_step and heard.count(name) == 1:
            raise ConnectionError(f"worker lost right after the {name} commit")

    def ingest_with_hook(*args, **kwargs):
        return real(*args, on_step=hook, **kwargs)

    monkeypatch.setattr(assets.ingest, "ingest_offsets", ingest_with_hook)
    return heard


@pytest.mark.parametrize("failing_step", ["billing_events", "quarantine", "postgres", "raw"])
def test_run_failing_after_the_write_is_retried_and_adds_nothing(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, failing_step: str
):
    """The op fails between two of the batch's commits (billing_events, then quarantine
    beside Postgres, then raw/, then the consumer group); Dagster's retry finishes the
    batch: nothing lost, nothing twice, in the lake or in the balances."""
    instance = dg.DagsterInstance.ephemeral()
    records = generated(seed=13, count=2_000)
    pipeline.produce(records)
    (request,), _, _ = evaluate_sensor(pipeline, instance, None)
    heard = fail_once_after(monkeypatch, failing_step)
    result = materialize(pipeline, request, instance)
    assert result.success
    assert "STEP_UP_FOR_RETRY" in [e.event_type_value for e in result.all_events]
    # The first attempt stopped right after its failing step; the retry ran every step.
    first_attempt = list(COMMIT_STEPS[: COMMIT_STEPS.index(failing_step) + 1])
    assert heard == first_attempt + list(COMMIT_STEPS)
    # After raw/, only the consumer-group commit was left: checked at the end.
    assert_converged(pipeline, records, consumer_group=failing_step != "raw")

    serving = materialization(result, "customer_balances").metadata
    accepted = lake_rows(pipeline, BILLING_EVENTS_TABLE).height
    # Before raw/ commits, the retry reads the whole batch again; after, nothing.
    reread = len(records) if failing_step != "raw" else 0
    assert materialization(result, "raw_billing_events").metadata["records_read"].value == reread
    # Postgres is applied only after billing_events: when the first attempt stopped
    # there, the retry applied the committed rows as a repair before its batch. Otherwise
    # the first attempt applied them and the retry's batch found its offsets applied.
    repaired = accepted if failing_step == "billing_events" else 0
    assert serving["repaired_events"].value == repaired
    assert serving["events_applied"].value == 0
    assert serving["events_already_applied"].value == (accepted if reread else 0)
    with connect(pipeline.settings.postgres_url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT kind, sum(events_applied) FROM balance_batches GROUP BY kind ORDER BY kind"
        )
        ledger = dict(cursor.fetchall())
    assert ledger == ({"repair": accepted} if repaired else {"batch": accepted})

    # And a whole new run of the same range, as a UI re-execution would do, adds nothing.
    monkeypatch.undo()
    before = balances(pipeline.settings.postgres_url)
    assert materialize(pipeline, request, instance).success
    assert_converged(pipeline, records, consumer_group=failing_step != "raw")
    assert balances(pipeline.settings.postgres_url) == before
    if not consumer_group_at_log_end(pipeline):
        # Known gap, reported: a retry (or rerun) whose offsets raw/ already holds reads
        # nothing and so commits nothing to the consumer group, which keeps showing lag
        # for them until new records arrive on those partitions. Data is unaffected.
        pytest.xfail("consumer group not committed after a failure between raw/ and it")


def assert_converged(
    pipeline: Pipeline, records: list[GeneratedRecord], *, consumer_group: bool = True
) -> None:
    """Every delivery once in raw/, every reject once in quarantine, every event once in
    billing_events, transaction_history and the balances (vs an independent sum), and
    (unless told not to check) the consumer group at the end of the log."""
    valid = sum(1 for r in records if r.kind != "invalid")
    raw = lake_rows(pipeline)
    assert raw.height == valid
    assert raw.select("kafka_partition", "kafka_offset").n_unique() == valid
    quarantine = lake_rows(pipeline, QUARANTINE_TABLE)
    assert quarantine.height == len(records) - valid
    assert quarantine.select("kafka_partition", "kafka_offset").n_unique() == quarantine.height
    events = lake_rows(pipeline, BILLING_EVENTS_TABLE)
    assert sorted(events["event_id"]) == sorted({r.event.event_id for r in records if r.event})
    url = pipeline.settings.postgres_url
    assert balances(url) == expected_balances(records, SyntheticBillingStream().reference_data())
    assert history_counts(url) == (events.height, events.height)
    assert balances_not_matching_history(url) == []
    if consumer_group:
        assert consumer_group_at_log_end(pipeline)


def consumer_group_at_log_end(pipeline: Pipeline) -> bool:
    with pipeline.client() as client:
        ends = client.end_offsets(pipeline.settings.topic)
        committed = client.committed(pipeline.settings.topic)
    return {p: o for p, o in committed.items() if o is not None} == {
        p: e for p, e in ends.items() if e > 0
    }


def request_ranges(request: dg.RunRequest) -> dict[int, tuple[int, int]]:
    config = request.run_config["ops"][INGEST_OP]["config"]
    return {r["partition"]: (r["start"], r["end"]) for r in config["ranges"]}


def test_sensor_rerequests_offsets_whose_run_never_committed(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    pipeline.produce(generated(seed=14, count=600))
    (first,), cursor, _ = evaluate_sensor(pipeline, instance, None)
    pipeline.produce(generated(seed=15, count=600))
    # The first run never ran and none is queued: the next tick asks again from the lake.
    (second,), _, _ = evaluate_sensor(pipeline, instance, cursor)
    assert all(start == 0 for start, _ in request_ranges(second).values())
    assert set(request_ranges(first)) <= set(request_ranges(second))


def test_a_later_run_covers_offsets_an_earlier_failed_run_left_behind(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    first_records = generated(seed=16, count=600)
    pipeline.produce(first_records)
    (first,), _cursor, _ = evaluate_sensor(pipeline, instance, None)
    second_records = generated(seed=17, count=600)
    pipeline.produce(second_records)
    with pipeline.client() as client:
        ends = client.end_offsets(pipeline.settings.topic)
    done = request_ranges(first)
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


def produce_at(
    pipeline: Pipeline, records: list[tuple[GeneratedRecord, datetime]]
) -> list[tuple[int, int]]:
    """Produce each record with the given Kafka timestamp (CreateTime); returns the
    (partition, offset) each landed at, in the order given."""
    producer = make_producer(pipeline.settings.kafka_bootstrap_servers)
    positions: list[tuple[int, int] | None] = [None] * len(records)
    errors: list[object] = []

    def on_delivery(index: int) -> Callable[[object, object], None]:
        def delivered(error, message) -> None:
            if error is not None:
                errors.append(error)
            else:
                positions[index] = (message.partition(), message.offset())

        return delivered

    for index, (record, at) in enumerate(records):
        producer.produce(
            pipeline.settings.topic,
            key=record.key,
            value=record.value,
            timestamp=int(at.timestamp() * 1000),
            on_delivery=on_delivery(index),
        )
        producer.poll(0)
    assert producer.flush(60) == 0 and errors == []
    return positions  # type: ignore[return-value]


def positions_of(frame: pl.DataFrame) -> set[tuple[int, int]]:
    return set(frame.select("kafka_partition", "kafka_offset").iter_rows())


def test_materializing_an_hour_from_the_ui_takes_that_hours_offsets(pipeline: Pipeline):
    instance = dg.DagsterInstance.ephemeral()
    stream = SyntheticBillingStream(seed=19, invalid_rate=0.02, duplicate_rate=0.03)
    # Two past log hours: records carry event times and Kafka timestamps inside them.
    hours = [hour_start(datetime.now(UTC)) - 3 * HOUR, hour_start(datetime.now(UTC)) - 2 * HOUR]
    timed: dict[datetime, list[tuple[GeneratedRecord, datetime]]] = {}
    for hour in hours:
        moment = hour + timedelta(minutes=20)
        timed[hour] = [
            (record, moment + timedelta(milliseconds=100 * n))
            for n, record in enumerate(stream.records(250, now=moment))
        ]
    landed = {hour: produce_at(pipeline, timed[hour]) for hour in hours}
    by_kind = {
        hour: {
            kind: {
                at
                for (record, _), at in zip(timed[hour], landed[hour], strict=True)
                if record.kind == kind
            }
            for kind in ("valid", "duplicate", "invalid")
        }
        for hour in hours
    }
    earlier, later = hours

    # A UI launch of the earlier hour's partition: no offsets config, only the hour.
    result = dg.materialize(
        [pipeline.asset],
        partition_key=hour_key(earlier),
        resources=pipeline.resources,
        instance=instance,
    )
    assert result.success
    expected = by_kind[earlier]
    assert positions_of(lake_rows(pipeline)) == expected["valid"] | expected["duplicate"]
    assert positions_of(lake_rows(pipeline, BILLING_EVENTS_TABLE)) == expected["valid"]
    assert positions_of(lake_rows(pipeline, QUARANTINE_TABLE)) == expected["invalid"]
    assert lake_rows(pipeline)["kafka_timestamp"].dt.truncate("1h").unique().to_list() == [earlier]

    # The sensor then asks for exactly the later hour's offsets, under that hour's key.
    requests, _, _ = evaluate_sensor(pipeline, instance, None)
    assert {r.partition_key for r in requests} == {hour_key(later)}
    requested = {
        (partition, offset)
        for request in requests
        for partition, (start, end) in request_ranges(request).items()
        for offset in range(start, end)
    }
    assert requested == set(landed[later])


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
    # New records at old offsets would look processed: the sensor and the run both refuse
    # (the sensor's tick says why; docs/runbooks/topic-recreated.md).
    requests, _, skip = evaluate_sensor(pipeline, instance, None)
    assert requests == [] and "recreated" in skip.skip_message
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


def payment_without_event_time(
    event_id: str, customer_id: int = 1001, amount: str = "42.50"
) -> GeneratedRecord:
    """A JSON payment with no created_at field: its event time is its Kafka timestamp."""
    body = {
        "event_id": event_id,
        "customer_id": customer_id,
        "transaction_type": "PAYMENT",
        "amount": amount,
        "currency": "USD",
        "metadata": None,
        "tax_amount": None,
    }
    return GeneratedRecord(str(customer_id).encode(), json.dumps(body).encode(), "crafted")


def run_batch(pipeline: Pipeline, instance: dg.DagsterInstance, cursor: str | None = None):
    """One sensor tick and its runs, as the daemon would do; returns each run's
    billing_events metadata (oldest log hour first) and the new cursor."""
    requests, cursor, _ = evaluate_sensor(pipeline, instance, cursor)
    metadata = []
    for request in requests:
        result = materialize(pipeline, request, instance)
        assert result.success
        metadata.append(materialization(result, "billing_events").metadata)
    return metadata, cursor


def run_refresh(
    pipeline: Pipeline, instance: dg.DagsterInstance, cursor: str | None = None
) -> tuple[dg.ExecuteInProcessResult | None, str | None]:
    """One tick of the revenue refresh sensor and the run it requests (job refresh_revenue,
    with the request's tags), as the daemon would do: the result (None if it requested
    nothing) and the new cursor. Call it after run_batch to see the aggregates."""
    sensor = pipeline.defs.resolve_sensor_def("revenue_refresh_sensor")
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=pipeline.resources
    )
    result = sensor(context)
    if isinstance(result, dg.SkipReason):
        return None, cursor
    (request,) = result.run_requests
    run = pipeline.defs.resolve_job_def("refresh_revenue").execute_in_process(
        instance=instance,
        tags={**request.tags, "dagster/run_key": request.run_key},
        raise_on_error=False,
    )
    return run, result.cursor


def redeliver(pipeline: Pipeline, first: datetime, later: list[datetime]) -> tuple[str, list]:
    """One payment without created_at delivered at Kafka time `first` and ingested, then
    delivered again at each of `later` and ingested; returns its event_id and the later
    runs' billing_events metadata."""
    instance = dg.DagsterInstance.ephemeral()
    event_id = str(uuid.uuid4())
    record = payment_without_event_time(event_id)
    produce_at(pipeline, [(record, first)])
    (first_run,), cursor = run_batch(pipeline, instance, None)
    assert (first_run["accepted"].value, first_run["duplicates"].value) == (1, 0)
    produce_at(pipeline, [(record, at) for at in later])
    runs, _ = run_batch(pipeline, instance, cursor)
    return event_id, runs


def history_rows(url: str, event_id: str) -> list[tuple]:
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT created_at, amount_usd::text FROM transaction_history "
            "WHERE event_id = %s ORDER BY created_at",
            (event_id,),
        )
        return cursor.fetchall()


def test_redelivery_without_event_time_in_a_later_hour_or_day_is_a_duplicate(
    pipeline: Pipeline,
):
    """Without created_at, event time is the Kafka timestamp, so a re-send lands in
    another event hour and day; it is still the same event, recognised across runs."""
    day = datetime.combine(datetime.now(UTC).date() - timedelta(days=3), datetime.min.time(), UTC)
    first = day + timedelta(hours=10, minutes=10)
    later_hour, later_day = first + HOUR, first + timedelta(days=1)
    event_id, runs = redeliver(pipeline, first, [later_hour, later_day])
    # One run per log hour of the redeliveries: each is a duplicate, none accepted.
    assert [(m["accepted"].value, m["duplicates"].value) for m in runs] == [(0, 1), (0, 1)]
    assert all(m["quarantined"].value == 0 for m in runs)

    raw = lake_rows(pipeline).sort("kafka_offset")
    assert raw["event_id"].to_list() == [event_id] * 3  # every delivery kept in raw/
    assert raw["created_at"].to_list() == [first, later_hour, later_day]
    events = lake_rows(pipeline, BILLING_EVENTS_TABLE)
    assert events.select("event_id", "created_at").rows() == [(event_id, first)]
    url = pipeline.settings.postgres_url
    assert history_rows(url, event_id) == [(first, "42.50")]
    assert balances(url) == {1001: Decimal("42.50")}


def test_redelivery_beyond_the_dedupe_horizon_is_accepted_again(
    kafka, topic: str, lake_root: str, serving_url: str
):
    """The documented limit: deliveries further apart in event time than
    BILLING_DEDUPE_HORIZON_DAYS are not compared, so a re-send without created_at that
    far later counts a second time (in billing_events, history and the balance)."""
    pipeline = Pipeline(
        pipeline_env(kafka, topic, lake_root, serving_url, BILLING_DEDUPE_HORIZON_DAYS="1")
    )
    day = datetime.combine(datetime.now(UTC).date() - timedelta(days=5), datetime.min.time(), UTC)
    first = day + timedelta(hours=10, minutes=10)
    within, beyond = first + timedelta(hours=20), first + timedelta(days=3)
    event_id, runs = redeliver(pipeline, first, [within, beyond])
    # 20 hours later: within the 1-day horizon, a duplicate. 3 days later: accepted again.
    assert [(m["accepted"].value, m["duplicates"].value) for m in runs] == [(0, 1), (1, 0)]

    events = lake_rows(pipeline, BILLING_EVENTS_TABLE).sort("created_at")
    assert events.select("event_id", "created_at").rows() == [
        (event_id, first),
        (event_id, beyond),
    ]
    url = pipeline.settings.postgres_url
    assert history_rows(url, event_id) == [(first, "42.50"), (beyond, "42.50")]
    assert balances(url) == {1001: Decimal("85.00")}
    assert balances_not_matching_history(url) == []
