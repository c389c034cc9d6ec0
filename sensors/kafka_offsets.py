import json
from datetime import UTC, datetime

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets.pools import INGEST_POOL
from billing_dagster.contract import RAW_TABLE
from billing_dagster.delta_lake import committed_offsets
from billing_dagster.ingest import record_origins
from billing_dagster.kafka_io import kafka_topic_of
from billing_dagster.lanes import ALL_LANES, LANE_TAG, busy_lanes, lane_tag, plan_lanes
from billing_dagster.lost_offsets import describe_lost, lost_offsets
from billing_dagster.offsets import (
    OffsetLookup,
    OffsetRange,
    PlannedBatch,
    RetryState,
    TopicResetError,
    hour_key,
    next_retry,
    retry_delay,
    retry_run_key,
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
    batch: PlannedBatch,
    op_name: str,
    *,
    lane: str,
    run_key: str | None = None,
    tags: dict | None = None,
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
        tags={"billing/records": str(batch.size), LANE_TAG: lane, **(tags or {})},
    )


def _parse_retries(raw: str | None) -> dict[str, RetryState]:
    """Per lane, the re-requests made since its lake offsets last moved (the cursor's
    "retry"; a cursor from before lanes holds one state for all partitions: dropped)."""
    retries = json.loads(raw).get("retry") if raw else None
    if not retries or "marks" in retries:
        return {}
    return {
        lane: RetryState(r["marks"], int(r["attempt"]), datetime.fromisoformat(r["at"]))
        for lane, r in retries.items()
    }


def _cursor_text(topic: str, offsets: dict[int, int], retries: dict[str, RetryState]) -> str:
    state: dict[str, object] = {
        "topic": topic,
        "offsets": {str(p): o for p, o in sorted(offsets.items())},
    }
    if retries:
        state["retry"] = {
            lane: {"marks": r.marks, "attempt": r.attempt, "at": r.at.isoformat()}
            for lane, r in sorted(retries.items())
        }
    return json.dumps(state)


def _rerequest(
    context: dg.SensorEvaluationContext,
    lane: str,
    batches: tuple[PlannedBatch, ...],
    committed: dict[int, int | None],
    op_name: str,
    retries: dict[str, RetryState],
    now: datetime,
    waiting: list[str],
) -> list[dg.RunRequest]:
    """Offsets a run of this lane left uncommitted (it failed for good, or crashed),
    asked again from the lake's offsets: under a new run key (the same offsets give the
    same key, which Dagster would skip), at once the first time, then backing off while
    they keep failing. Updates `retries`; a lane backing off says so in `waiting`."""
    previous = retries.get(lane)
    retry = next_retry(previous, committed, now)
    if retry is None:
        due = previous.at + retry_delay(previous.attempt)
        waiting.append(
            f"lane {lane}: offsets a failed run left were re-requested {previous.attempt} "
            f"time(s) without committing; next re-request after {due:%H:%M:%S} UTC"
        )
        return []
    context.log.warning(
        f"lane {lane}: lake is behind requested offsets with no run in flight; "
        f"re-requesting (attempt {retry.attempt} from the lake's offsets)"
    )
    retries[lane] = retry
    return [_run_request(b, op_name, lane=lane, run_key=retry_run_key(b, retry)) for b in batches]


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
        lane=ALL_LANES,
        run_key=f"repair:{batch.run_key}:{int(now.timestamp()) // 60}",
        tags={REPAIR_TAG: ranges},
    )


def _refuse(context: dg.SensorEvaluationContext, exc: TopicResetError) -> dg.SkipReason:
    """A recreated or truncated topic: no run, the cursor kept, the operator's message in
    the tick and the log (not a stack trace)."""
    context.log.error(str(exc))
    return dg.SkipReason(f"refused: {exc}")


def _ensure_pool_limit(context: dg.SensorEvaluationContext, lanes: int) -> None:
    """The ingest pool admits one run per lane: its limit is the lane count (the pools'
    default limit, 1, would put the lanes back in one file)."""
    storage = context.instance.event_log_storage
    if storage.get_concurrency_info(INGEST_POOL).slot_count != lanes:
        storage.set_concurrency_slots(INGEST_POOL, lanes)
        context.log.info(f"concurrency pool {INGEST_POOL} limit set to {lanes} (lanes)")


def _cached(lookup: OffsetLookup) -> OffsetLookup:
    """One Kafka time lookup per moment per tick, however many lanes ask for it."""
    seen: dict[datetime, dict[int, int | None]] = {}

    def cached(moment: datetime) -> dict[int, int | None]:
        if moment not in seen:
            seen[moment] = dict(lookup(moment))
        return seen[moment]

    return cached


def build_kafka_offsets_sensor(
    job: UnresolvedAssetJobDefinition,
    *,
    op_name: str,
    interval_s: int,
    max_records_per_run: int,
    start_from: str,
    lanes: int = 1,
) -> dg.SensorDefinition:
    @dg.sensor(
        name="kafka_offsets_sensor",
        job=job,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Polls the billing topic's end offsets and requests, per lane ({lanes}: "
            "partition modulo lanes), one run per log hour for the offsets not yet "
            "requested; none for a lane while its run is queued or running (what arrives "
            "meanwhile goes into one run after it). The cursor holds requested offsets "
            "per partition."
        ),
    )
    def kafka_offsets_sensor(
        context: dg.SensorEvaluationContext,
        kafka: KafkaResource,
        lake: DeltaLakeResource,
        postgres: PostgresServingResource,
    ) -> dg.SensorResult | dg.SkipReason:
        topic = kafka.topic
        _ensure_pool_limit(context, lanes)
        # Any run that ingests, not only this job's: a UI Materialize, a backfill, a rerun.
        in_flight = ingest_runs_in_flight(context.instance)
        busy = busy_lanes((run.tags.get(LANE_TAG) for run in in_flight), lanes)
        cursor = _parse_cursor(context.cursor, topic)
        if cursor is not None and len(busy) == lanes:
            # Nothing to ask Kafka or the lake until a lane is free.
            return dg.SkipReason("every lane has an ingest run queued or running")
        now = datetime.now(UTC)
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
                plans = plan_lanes(
                    topic,
                    lanes=lanes,
                    busy=busy,
                    cursor=cursor,
                    lows={p: low for p, (low, _) in kept.items()},
                    ends={p: high for p, (_, high) in kept.items()},
                    committed={p: committed[p] for p in kept},
                    start_from=start_from,
                    now=now,
                    offset_lookup=_cached(lambda moment: client.offsets_for_time(topic, moment)),
                    max_records_per_run=max_records_per_run,
                )
            except TopicResetError as exc:
                return _refuse(context, exc)
        origins = {p: o for lane in plans for p, o in lane.plan.origins.items()}
        record_origins(lake.location(), topic, origins)
        # Every kept partition, busy lanes' too (their plan keeps the cursor). A partition
        # left out for lost offsets drops out: after the gap is acknowledged it starts
        # again from the lake's marks, past the gap.
        offsets = {p: o for lane in plans for p, o in lane.plan.cursor.items()}
        retries = _parse_retries(context.cursor)
        requests: list[dg.RunRequest] = []
        waiting: list[str] = []
        for lane in plans:
            tag = lane_tag(lane.lane, lanes)
            if lane.plan.recovering and lane.plan.batches:
                mine = {p: committed[p] for p in lane.plan.cursor}
                requests += _rerequest(
                    context, tag, lane.plan.batches, mine, op_name, retries, now, waiting
                )
            elif lane.lane not in busy:
                # The lake caught up with what the lane requested: its back-off is over.
                # (A busy lane keeps it: its run may be the re-request, failing again.)
                retries.pop(tag, None)
                requests += [_run_request(b, op_name, lane=tag) for b in lane.plan.batches]
        new_cursor = _cursor_text(topic, offsets, retries)
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=new_cursor)
        if not any(lane.plan.batches for lane in plans) and not busy:
            repair = _repair_request(context, postgres, lake, topic, sorted(marks), op_name, now)
            if repair is not None:
                return dg.SensorResult(run_requests=[repair], cursor=new_cursor)
        context.update_cursor(new_cursor)
        if waiting:
            return dg.SkipReason("; ".join(waiting))
        return dg.SkipReason(f"no new records for the free lanes of {topic}")

    return kafka_offsets_sensor
