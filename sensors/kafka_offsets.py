import json
from datetime import UTC, datetime

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from billing_dagster.contract import RAW_TABLE
from billing_dagster.delta_lake import committed_offsets
from billing_dagster.ingest import record_origins
from billing_dagster.offsets import (
    OffsetRange,
    PlannedBatch,
    hour_key,
    plan_sensor_tick,
    waits_for_run,
)
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.projection import decided_marks, serving_gaps
from resources import DeltaLakeResource, KafkaResource, PostgresServingResource

#: Tag of a run requested only to bring Postgres up to the lake (its catch-up step).
REPAIR_TAG = "billing/repair"

#: A run counts as in flight from the moment the queue holds it.
WAITING_OR_RUNNING = [dg.DagsterRunStatus.QUEUED, *IN_PROGRESS_RUN_STATUSES]


def _parse_cursor(raw: str | None, topic: str) -> dict[int, int] | None:
    if not raw:
        return None
    state = json.loads(raw)
    if state.get("topic") != topic:
        return None  # the topic setting changed: start from the lake's offsets for it
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
        in_flight = bool(
            context.instance.get_run_ids(
                dg.RunsFilter(job_name=job.name, statuses=WAITING_OR_RUNNING),
                limit=1,
            )
        )
        if waits_for_run(cursor, in_flight):
            # Nothing to ask Kafka or the lake until the run ends.
            return dg.SkipReason("an ingest run is queued or running; new offsets wait for it")
        with kafka.client() as client:
            marks = client.watermarks(topic)
            committed = committed_offsets(lake.location().open(RAW_TABLE), topic, list(marks))
            plan = plan_sensor_tick(
                topic,
                cursor=cursor,
                lows={p: low for p, (low, _) in marks.items()},
                ends={p: high for p, (_, high) in marks.items()},
                committed=committed,
                runs_in_flight=in_flight,
                start_from=start_from,
                now=datetime.now(UTC),
                offset_lookup=lambda moment: client.offsets_for_time(topic, moment),
                max_records_per_run=max_records_per_run,
            )
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
            context.log.warning(
                "lake is behind requested offsets with no run in flight; re-requesting"
            )
        return dg.SensorResult(
            run_requests=[_run_request(b, op_name) for b in plan.batches], cursor=new_cursor
        )

    return kafka_offsets_sensor
