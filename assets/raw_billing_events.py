import dagster as dg

from billing_dagster.contract import RAW_TABLE
from billing_dagster.ingest import IngestReport, ingest_offsets
from billing_dagster.kafka_io import OffsetsLostError
from billing_dagster.offsets import (
    OffsetRange,
    TopicResetError,
    parse_hour_key,
    ranges_for_hour,
    ranges_to_json,
    ranges_to_text,
)
from resources import DeltaLakeResource, KafkaResource


class OffsetRangeConfig(dg.Config):
    partition: int
    start: int
    end: int


class KafkaBatchConfig(dg.Config):
    """Which offsets to ingest. Left empty (a UI launch, a backfill), the run takes every
    offset of its partition's log hour; the lake's offsets make that safe to repeat."""

    topic: str = ""
    ranges: list[OffsetRangeConfig] = []  # noqa: RUF012 (pydantic copies defaults)


def report_metadata(report: IngestReport) -> dict[str, object]:
    return {
        "topic": report.topic,
        "records_read": report.records_read,
        "events_written": report.events_written,
        "events_already_committed": report.events_already_committed,
        "quarantined": report.quarantined_written,
        "quarantined_already_committed": report.quarantined_already_committed,
        "requested_ranges_already_committed": len(report.plan.already_committed),
        # Compact "partition:start-end" text reads better in the UI than nested JSON lists.
        "offset_ranges_read": ranges_to_text(report.plan.reads),
        "gaps_covered": ranges_to_json(report.plan.gaps_covered),
        "processed_up_to": " ".join(f"{p}:{o}" for p, o in sorted(report.processed_up_to.items())),
        "raw_table_version": report.raw_table_version
        if report.raw_table_version is not None
        else -1,
        "event_hours": ", ".join(report.event_hours),
        "dagster/row_count": report.events_written,
    }


def build_raw_billing_events(partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="raw_billing_events",
        partitions_def=partitions_def,
        group_name="ingest",
        kinds={"kafka", "polars", "delta"},
        description=(
            "Every billing event read from Kafka, decoded to the BillingEvent contract, in "
            "the Delta table raw/ (year/month/day/hour of event time). Undecodable records go "
            "to quarantine/ with their reason. Exactly once per Kafka offset."
        ),
        metadata={"lake_table": RAW_TABLE},
        retry_policy=dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL),
    )
    def raw_billing_events(
        context: dg.AssetExecutionContext,
        config: KafkaBatchConfig,
        kafka: KafkaResource,
        lake: DeltaLakeResource,
    ) -> dg.MaterializeResult:
        topic = config.topic or kafka.topic
        with kafka.client() as client:
            if config.ranges:
                ranges = [OffsetRange(r.partition, r.start, r.end) for r in config.ranges]
            else:
                hour = parse_hour_key(context.partition_key)
                ranges = list(
                    ranges_for_hour(
                        hour,
                        lambda moment: client.offsets_for_time(topic, moment),
                        client.end_offsets(topic),
                    )
                )
                context.log.info(f"log hour {context.partition_key} is offsets {ranges}")
            try:
                report = ingest_offsets(
                    client, lake.location(), topic, ranges, run_id=context.run.run_id
                )
            except (TopicResetError, OffsetsLostError) as exc:
                # Retrying cannot fix these; fail at once with the operator's message.
                raise dg.Failure(str(exc), allow_retries=False) from exc
        if report.plan.gaps_covered:
            context.log.warning(
                "covered offsets an earlier run left uncommitted: "
                + ranges_to_json(report.plan.gaps_covered)
            )
        return dg.MaterializeResult(metadata=report_metadata(report))

    return raw_billing_events
