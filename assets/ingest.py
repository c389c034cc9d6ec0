from dataclasses import replace

import dagster as dg
from dagster._core.storage.tags import RETRY_ON_ASSET_OR_OP_FAILURE_TAG

from assets.pools import INGEST_POOL
from billing_dagster.circuit_breaker import (
    BREAKER_RULE_TAG,
    BREAKER_TAG,
    HELD,
    RELEASE,
    CircuitBreakerOpenError,
)
from billing_dagster.contract import BILLING_EVENTS_TABLE, QUARANTINE_TABLE, RAW_TABLE
from billing_dagster.decisions import RefusedAfterDecisionError
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.enrichment import ReferenceDataError
from billing_dagster.ingest import IngestReport, ingest_offsets
from billing_dagster.kafka_io import KafkaClient, OffsetsLostError
from billing_dagster.lanes import ALL_LANES, LANE_TAG
from billing_dagster.log_time import HiddenRecords, RecordingLookup, check_hours
from billing_dagster.lost_offsets import describe_lost
from billing_dagster.offsets import (
    OffsetRange,
    TopicResetError,
    parse_hour_key,
    ranges_for_hour,
    ranges_to_json,
    ranges_to_text,
)
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.schema_registry import SchemaRegistryUnavailableError
from billing_dagster.serving import ServingGapError
from billing_dagster.serving_batch import ServingRefusedError
from billing_dagster.topic_identity import (
    check_key,
    check_serving_identity,
    resolve_generation,
)
from resources import (
    BillingRulesResource,
    DeltaLakeResource,
    KafkaResource,
    PostgresServingResource,
)

#: The op that reads one batch of offsets and materializes both assets.
INGEST_OP = "ingest_billing_batch"
#: The job of the ingest lane (its runs carry the billing/ingest tag).
INGEST_JOB = "ingest_billing_events"
RAW_BILLING_EVENTS = dg.AssetKey("raw_billing_events")
BILLING_EVENTS = dg.AssetKey("billing_events")
CUSTOMER_BALANCES = dg.AssetKey("customer_balances")
TRANSACTION_HISTORY = dg.AssetKey("transaction_history")


class OffsetRangeConfig(dg.Config):
    partition: int
    start: int
    end: int


class KafkaBatchConfig(dg.Config):
    """Which offsets to ingest. Left empty (a UI launch, a backfill), the run takes every
    offset of its partition's log hour; the lake's offsets make that safe to repeat."""

    topic: str = ""
    ranges: list[OffsetRangeConfig] = []  # noqa: RUF012 (pydantic copies defaults)


def raw_metadata(report: IngestReport) -> dict[str, object]:
    return {
        "topic": report.topic,
        "records_read": report.records_read,
        "rows_written": report.raw_written,
        "requested_ranges_already_committed": len(report.plan.already_committed),
        # Compact "partition:start-end" text reads better in the UI than nested JSON lists.
        "offset_ranges_read": ranges_to_text(report.plan.reads),
        "gaps_covered": ranges_to_json(report.plan.gaps_covered),
        # Offsets retention deleted before the lake read them: left out, see the warning.
        "offsets_lost": ranges_to_text(report.plan.lost),
        "processed_up_to": " ".join(f"{p}:{o}" for p, o in sorted(report.processed_up_to.items())),
        "raw_table_version": report.raw_table_version
        if report.raw_table_version is not None
        else -1,
        "dagster/row_count": report.raw_written,
    }


def billing_events_metadata(
    report: IngestReport, reference_versions: dict[str, int]
) -> dict[str, object]:
    return {
        "topic": report.topic,
        # The batch's accounting: input = accepted + duplicates + quarantined.
        "input_records": report.records_read,
        "accepted": report.accepted,
        "accepted_written": report.accepted_written,
        "accepted_already_committed": report.accepted_already_committed,
        "duplicates": report.duplicates,
        "quarantined": report.quarantined,
        "quarantined_written": report.quarantined_written,
        "counts_balance": report.balanced,
        "quarantined_by_rule": dg.MetadataValue.json(report.quarantined_by_rule),
        "event_hours": ", ".join(report.event_hours),
        "billing_events_version": report.billing_events_version
        if report.billing_events_version is not None
        else -1,
        "reference_versions": dg.MetadataValue.json(reference_versions),
        "offset_ranges_read": ranges_to_text(report.plan.reads),
        # Where the batch's time went; bench/catch_up.py sums these over runs.
        "phase_seconds": dg.MetadataValue.json(
            {phase: round(seconds, 3) for phase, seconds in report.timings.items()}
        ),
        "dagster/row_count": report.accepted_written,
    }


def serving_metadata(report: IngestReport) -> dict[str, object]:
    serving = report.serving
    if serving is None:
        return {}
    repair = report.serving_repair
    return {
        # Offsets applied from billing_events before the batch: Postgres was behind.
        "repaired_from_billing_events": " ".join(
            f"{p}:{s}-{e}" for p, (s, e) in sorted(repair.applied.items())
        ),
        "repaired_events": repair.events_applied,
        "events_applied": serving.events_applied,
        "events_already_applied": serving.events_already_applied,
        "customers_updated": serving.customers_updated,
        "history_rows_inserted": serving.history_inserted,
        "ledger_batch_id": serving.batch_id or "",
        "partitions_created": ", ".join(serving.partitions_created),
    }


def _held(context: dg.AssetExecutionContext, exc: CircuitBreakerOpenError) -> dg.Failure:
    """The failure of a held batch, not retried (retrying cannot fix it). The run is tagged
    so the alert and `release-batch` find it, and so Dagster's run retries skip it."""
    verdict, worst = exc.verdict, exc.verdict.tripped[0]
    context.instance.add_run_tags(
        context.run.run_id,
        {
            BREAKER_TAG: HELD,
            BREAKER_RULE_TAG: verdict.summary()[:200],
            RETRY_ON_ASSET_OR_OP_FAILURE_TAG: "false",
        },
    )
    return dg.Failure(
        description=str(exc),
        metadata={
            "circuit_breaker": HELD,
            "rule": worst.rule,
            "share_percent": str(worst.share(verdict.records)),
            "failing_records": worst.records,
            "batch_records": verdict.records,
            "sample_reason": worst.sample_reason,
        },
        allow_retries=False,
    )


def verified_topic_key(
    client: KafkaClient, location: LakeLocation, serving_url: str, requested: str, default: str
) -> str:
    """The topic key this run processes, its Kafka topic ID checked against the one the
    lake's and Postgres' marks belong to: a recreated topic is refused before anything is
    read (billing_dagster/topic_identity.py)."""
    try:
        topic_id = client.topic_id(requested or default)
        generation = (
            check_key(location, requested, topic_id)
            if requested
            else resolve_generation(location, default, topic_id)
        )
        check_serving_identity(serving_url, generation)
    except TopicResetError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    except ServingUnavailableError as exc:
        raise dg.Failure(str(exc)) from exc  # retried: Postgres may be restarting
    return generation.key


def _report_hidden(
    context: dg.AssetExecutionContext,
    topic: str,
    ranges: list[OffsetRange],
    hidden: list[HiddenRecords],
) -> None:
    """A log hour whose time index hides records (billing_dagster/log_time.py): warned
    about, and a run that would read nothing because of it fails instead of succeeding."""
    for found in hidden:
        context.log.warning(found.describe(topic))
    if hidden and not ranges:
        raise dg.Failure("; ".join(found.describe(topic) for found in hidden), allow_retries=False)


def build_ingest_assets(partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=INGEST_OP,
        partitions_def=partitions_def,
        group_name="ingest",
        pool=INGEST_POOL,
        specs=[
            dg.AssetSpec(
                RAW_BILLING_EVENTS,
                description=(
                    "Every billing event delivery read from Kafka, decoded to the "
                    "BillingEvent contract, in the Delta table raw/ (year/month/day/hour of "
                    "event time). Undecodable records go to quarantine/ with their reason. "
                    "Exactly once per Kafka offset."
                ),
                kinds={"kafka", "polars", "delta"},
                metadata={"lake_table": RAW_TABLE},
            ),
            dg.AssetSpec(
                BILLING_EVENTS,
                deps=[RAW_BILLING_EVENTS],
                description=(
                    "Accepted billing events: deduplicated by event_id (within the batch and "
                    "against everything accepted before), validated by the business rules, "
                    "enriched with customer tier, subscription plan and amount_usd. "
                    "Rejects go to quarantine/ with rule names and messages."
                ),
                kinds={"polars", "delta"},
                metadata={"lake_table": BILLING_EVENTS_TABLE, "quarantine_table": QUARANTINE_TABLE},
            ),
            dg.AssetSpec(
                CUSTOMER_BALANCES,
                deps=[BILLING_EVENTS],
                description=(
                    "Postgres customer_balances: per customer, the sum of amount_usd of accepted "
                    "events (USD), upserted once per batch with version + 1, exactly once per "
                    "Kafka offset (balance_offsets + the balance_batches ledger)."
                ),
                kinds={"postgres"},
                metadata={"table": "customer_balances"},
            ),
            dg.AssetSpec(
                TRANSACTION_HISTORY,
                deps=[BILLING_EVENTS],
                description=(
                    "Postgres transaction_history, partitioned by month of created_at (new "
                    "months are created before rows arrive); idempotent on transaction_id."
                ),
                kinds={"postgres"},
                metadata={"table": "transaction_history"},
            ),
        ],
        retry_policy=dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL),
    )
    def ingest_billing_batch(
        context: dg.AssetExecutionContext,
        config: KafkaBatchConfig,
        kafka: KafkaResource,
        lake: DeltaLakeResource,
        billing_rules: BillingRulesResource,
        postgres: PostgresServingResource,
    ):
        topic = config.topic or kafka.topic
        location = lake.location()
        try:
            cleaning = billing_rules.cleaning_context(location, kafka.value_format(topic))
        except ReferenceDataError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from exc
        if context.run.tags.get(BREAKER_TAG) == RELEASE:
            # An operator released this batch (`billing-dagster release-batch`).
            cleaning = replace(cleaning, breaker=replace(cleaning.breaker, released=True))
            context.log.warning("released: the circuit breaker does not hold this batch")
        try:
            migrated = postgres.ensure_migrated()
        except ServingUnavailableError as exc:
            raise dg.Failure(str(exc)) from exc  # retried: Postgres may be restarting
        if migrated:
            context.log.info(f"applied migrations: {', '.join(migrated)}")
        with kafka.client() as client:
            topic = verified_topic_key(client, location, postgres.url, config.topic, kafka.topic)
            if config.ranges:
                ranges = [OffsetRange(r.partition, r.start, r.end) for r in config.ranges]
            else:
                hour = parse_hour_key(context.partition_key)
                lookup = RecordingLookup(lambda moment: client.offsets_for_time(topic, moment))
                ends = client.end_offsets(topic)
                ranges = list(ranges_for_hour(hour, lookup, ends))
                context.log.info(f"log hour {context.partition_key} is offsets {ranges}")
                _report_hidden(
                    context, topic, ranges, check_hours(client, topic, [hour], lookup, ends)
                )
            try:
                report = ingest_offsets(
                    client,
                    location,
                    topic,
                    ranges,
                    cleaning=cleaning,
                    serving_url=postgres.url,
                    run_id=context.run.run_id,
                )
            except (
                TopicResetError,
                OffsetsLostError,
                ServingRefusedError,
                RefusedAfterDecisionError,
            ) as exc:
                # Retrying cannot fix these; fail at once with the operator's message.
                raise dg.Failure(str(exc), allow_retries=False) from exc
            except CircuitBreakerOpenError as exc:
                raise _held(context, exc) from exc
            except SchemaRegistryUnavailableError as exc:
                # An outage says nothing about the records: retried, never quarantined.
                raise dg.Failure(str(exc)) from exc
            except ServingUnavailableError as exc:
                # The lake kept its writes; the retry re-applies the batch to Postgres once.
                raise dg.Failure(str(exc)) from exc
            except ServingGapError as exc:
                # Postgres lost offsets while this run was applying (a restore, a failover):
                # the retry catches up from billing_events first.
                raise dg.Failure(str(exc)) from exc
        if report.plan.lost:
            lost = {r.partition: (r.start, r.end) for r in report.plan.lost}
            context.log.warning(
                "left out, the other partitions went on: " + describe_lost(topic, lost)
            )
        if report.serving_repair.applied:
            log = context.log.warning if report.serving_repair.repaired else context.log.info
            log(
                f"serving marks of {topic} were behind the lake: "
                + report.serving_repair.describe()
            )
        if report.plan.gaps_covered:
            context.log.warning(
                "covered offsets an earlier run left uncommitted: "
                + ranges_to_json(report.plan.gaps_covered)
            )
        # The lane (billing_dagster/lanes.py) beside the offsets, so the asset's history
        # in the UI tells the lanes' batches apart ("all": every partition of the hour).
        lane = {"lane": context.run.tags.get(LANE_TAG, ALL_LANES)}
        yield dg.MaterializeResult(
            asset_key=RAW_BILLING_EVENTS, metadata={**raw_metadata(report), **lane}
        )
        yield dg.MaterializeResult(
            asset_key=BILLING_EVENTS,
            metadata=billing_events_metadata(report, dict(cleaning.reference.versions or {})),
        )
        serving = serving_metadata(report)
        yield dg.MaterializeResult(asset_key=CUSTOMER_BALANCES, metadata=serving)
        yield dg.MaterializeResult(asset_key=TRANSACTION_HISTORY, metadata=serving)

    return ingest_billing_batch
