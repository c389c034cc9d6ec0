import json
from datetime import UTC, datetime

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from billing_dagster.contract import RAW_TABLE
from billing_dagster.delta_lake import committed_offsets
from billing_dagster.ingest import record_origins
from billing_dagster.offsets import PlannedBatch, plan_sensor_tick, waits_for_run
from resources import DeltaLakeResource, KafkaResource

#: A run counts as in flight from the moment the queue holds it.
WAITING_OR_RUNNING = [dg.DagsterRunStatus.QUEUED, *IN_PROGRESS_RUN_STATUSES]


def _parse_cursor(raw: str | None, topic: str) -> dict[int, int] | None:
    if not raw:
        return None
    state = json.loads(raw)
    if state.get("topic") != topic:
        return None  # the topic setting changed: start from the lake's offsets for it
    return {int(p): int(o) for p, o in state["offsets"].items()}


def _run_request(batch: PlannedBatch, op_name: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=batch.run_key,
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
        tags={"billing/records": str(batch.size)},
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
        context: dg.SensorEvaluationContext, kafka: KafkaResource, lake: DeltaLakeResource
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
