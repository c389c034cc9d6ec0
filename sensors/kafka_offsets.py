import json
from datetime import UTC, datetime

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from billing_dagster.contract import RAW_TABLE
from billing_dagster.delta_lake import committed_offsets
from billing_dagster.ingest import record_origins
from billing_dagster.kafka_io import kafka_topic_of
from billing_dagster.lost_offsets import describe_lost, lost_offsets
from billing_dagster.offsets import (
    OffsetRange,
    PlannedBatch,
    RetryState,
    TopicResetError,
    hour_key,
    next_retry,
    plan_sensor_tick,
    retry_delay,
    retry_run_key,
    waits_for_run,
)
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.projection import decided_marks, serving_gaps
from billing_dagster.topic_identity import resolve_generation
from resources import DeltaLakeResource, KafkaResource, PostgresServingResource

# WAITING_OR_RUNNING is imported from here too (alerts, the CLI, bench/).
from sensors.lane import WAITING_OR_RUNNING as WAITING_OR_RUNNING
from sensors.lane import ingest_runs_in_flight

#: Tag of a run requested only to bring Postgres up to the lake (its catch-up step).
REPAIR_TAG = "billing/repair"


def _parse_cursor(raw: str | None, topic: str) -> dict[int, int] | None:
    """`topic`: a topic key (the cursor must be that generation's), or a name (any of its
    generations: enough to tell whether a run is in flight)."""
    if not raw:
        return None
    state = json.loads(raw)
    if state.get("topic") != topic and kafka_topic_of(state.get("topic") or "") != topic:
        # The topic setting changed, or a recreated topic was adopted: start from the
        # lake's offsets for it.
        return None
    return {int(p): int(o) for p, o in state["offsets"].items()}


def _run_request(
    batch: PlannedBatch, op_name: str, *, run_key: str | None = None, tags: dict | None = None
) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=run_key or batch.run_key,
        partition_key=batch.partition_key,
        run_config={
            "ops": {
                op_name: {
                    "config": {
                        "topic": batch.topic,
                        "ranges": [
                            {"partition": r.partition, "start": r.start, "end": r.end}
                            for r in batch.ranges
                        ],
                    }
                }
            }
        },
        tags={"billing/records": str(batch.size), **(tags or {})},
    )


def _parse_retry(raw: str | None) -> RetryState | None:
    """The re-requests made since the lake's offsets last moved (the cursor's "retry")."""
    retry = json.loads(raw).get("retry") if raw else None
    if not retry:
        return None
    return RetryState(retry["marks"], int(retry["attempt"]), datetime.fromisoformat(retry["at"]))


def _with_retry(cursor: str, retry: RetryState) -> str:
    state = json.loads(cursor)
    state["retry"] = {"marks": retry.marks, "attempt": retry.attempt, "at": retry.at.isoformat()}
    return json.dumps(state)


def _rerequest(
    context: dg.SensorEvaluationContext,
    batches: tuple[PlannedBatch, ...],
    committed: dict[int, int | None],
    op_name: str,
    new_cursor: str,
) -> dg.SensorResult | dg.SkipReason:
    """Offsets a run left uncommitted (it failed for good, or crashed), asked again from
    the lake's offsets: under a new run key (the same offsets give the same key, which
    Dagster would skip), at once the first time, then backing off while they keep failing."""
    previous = _parse_retry(context.cursor)
    retry = next_retry(previous, committed, datetime.now(UTC))
    if retry is None:
        # The cursor stays as it is: the lake's offsets decide what the retry covers.
        due = previous.at + retry_delay(previous.attempt)
        return dg.SkipReason(
            f"offsets a failed run left were re-requested {previous.attempt} time(s) without "
            f"committing; next re-request after {due:%H:%M:%S} UTC"
        )
    context.log.warning(
        "lake is behind requested offsets with no run in flight; re-requesting "
        f"(attempt {retry.attempt} from the lake's offsets)"
    )
    return dg.SensorResult(
        run_requests=[_run_request(b, op_name, run_key=retry_run_key(b, retry)) for b in batches],
        cursor=_with_retry(new_cursor, retry),
    )


def _repair_request(
    context: dg.SensorEvaluationContext,
    postgres: PostgresServingResource,
    lake: DeltaLakeResource,
    topic: str,
    partitions: list[int],
    op_name: str,
    now: datetime,
) -> dg.RunRequest | None:
    """A run that applies billing_events to Postgres where its marks are behind the
    lake's (a restore from backup, a failover, a commit lost to a crash): its catch-up
    step does the work, the offsets themselves are not read again."""
    try:
        gaps = serving_gaps(postgres.url, topic, decided_marks(lake.location(), topic, partitions))
    except ServingUnavailableError as exc:
        context.log.warning(f"cannot compare the serving marks with the lake: {exc}")
        return None
    if not gaps:
        return None
    ranges = ", ".join(f"{p}:{m}-{d}" for p, (m, d) in sorted(gaps.items()))
    context.log.warning(
        f"Postgres is behind the lake on {topic} at offsets {ranges}; "
        "requesting a run to apply them from billing_events"
    )
    batch = PlannedBatch(
        topic, hour_key(now), tuple(OffsetRange(p, m, d) for p, (m, d) in sorted(gaps.items()))
    )
    # Once a minute at most: a repair that fails (Postgres down) is retried, not flooded.
    return _run_request(
        batch,
        op_name,
        run_key=f"repair:{batch.run_key}:{int(now.timestamp()) // 60}",
        tags={REPAIR_TAG: ranges},
    )


def _refuse(context: dg.SensorEvaluationContext, exc: TopicResetError) -> dg.SkipReason:
    """A recreated or truncated topic: no run, the cursor kept, the operator's message in
    the tick and the log (not a stack trace)."""
    context.log.error(str(exc))
    return dg.SkipReason(f"refused: {exc}")


def build_kafka_offsets_sensor(
    job: UnresolvedAssetJobDefinition,
    *,
    op_name: str,
    interval_s: int,
    max_records_per_run: int,
    start_from: str,
) -> dg.SensorDefinition:
    @dg.sensor(
        name="kafka_offsets_sensor",
        job=job,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Polls the billing topic's end offsets and requests one run per log hour for the "
            "offsets not yet requested (none while an ingest run is queued or running: what "
            "arrives meanwhile goes into one run after it); the cursor holds requested "
            "offsets per partition."
        ),
    )
    def kafka_offsets_sensor(
        context: dg.SensorEvaluationContext,
        kafka: KafkaResource,
        lake: DeltaLakeResource,
        postgres: PostgresServingResource,
    ) -> dg.SensorResult | dg.SkipReason:
        topic = kafka.topic
        cursor = _parse_cursor(context.cursor, topic)
        # Any run that ingests, not only this job's: a UI Materialize, a backfill, a rerun.
        in_flight = bool(ingest_runs_in_flight(context.instance))
        if waits_for_run(cursor, in_flight):
            # Nothing to ask Kafka or the lake until the run ends.
            return dg.SkipReason("an ingest run is queued or running; new offsets wait for it")
        with kafka.client() as client:
            try:
                # The key the marks of this Kafka topic are kept under; a recreated topic
                # (a new topic ID) is refused until adopted (topic_identity.py).
                topic = resolve_generation(lake.location(), topic, client.topic_id(topic)).key
            except TopicResetError as exc:
                return _refuse(context, exc)
            cursor = _parse_cursor(context.cursor, topic)
            marks = client.watermarks(topic)
            committed = committed_offsets(lake.location().open(RAW_TABLE), topic, list(marks))
            # A partition whose next offsets retention deleted waits for an operator;
            # the others are planned as usual (lost_offsets.py).
            lost = lost_offsets(committed, {p: low for p, (low, _) in marks.items()})
            if lost:
                context.log.warning(describe_lost(topic, lost))
            kept = {p: m for p, m in marks.items() if p not in lost}
            try:
                plan = plan_sensor_tick(
                    topic,
                    cursor=cursor,
                    lows={p: low for p, (low, _) in kept.items()},
                    ends={p: high for p, (_, high) in kept.items()},
                    committed={p: committed[p] for p in kept},
                    runs_in_flight=in_flight,
                    start_from=start_from,
                    now=datetime.now(UTC),
                    offset_lookup=lambda moment: client.offsets_for_time(topic, moment),
                    max_records_per_run=max_records_per_run,
                )
            except TopicResetError as exc:
                return _refuse(context, exc)
        record_origins(lake.location(), topic, plan.origins)
        new_cursor = json.dumps(
            {"topic": topic, "offsets": {str(p): o for p, o in sorted(plan.cursor.items())}}
        )
        if not plan.batches:
            repair = _repair_request(
                context, postgres, lake, topic, sorted(marks), op_name, datetime.now(UTC)
            )
            if repair is not None:
                return dg.SensorResult(run_requests=[repair], cursor=new_cursor)
            context.update_cursor(new_cursor)
            return dg.SkipReason(f"no new records on {topic}")
        if plan.recovering:
            return _rerequest(context, plan.batches, committed, op_name, new_cursor)
        return dg.SensorResult(
            run_requests=[_run_request(b, op_name) for b in plan.batches], cursor=new_cursor
        )

    return kafka_offsets_sensor
