"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from __future__ import annotations

import dagster as dg

from assets.ingest import INGEST_OP, build_ingest_assets
from assets.partitions import log_hour_partitions
from billing_dagster.settings import Settings, load_settings
from resources import (
    BillingRulesResource,
    DeltaLakeResource,
    KafkaResource,
    PostgresServingResource,
)
from sensors.kafka_offsets import build_kafka_offsets_sensor

#: Runs carrying this tag are limited to one at a time by the run queue (dev/dagster.yaml):
#: offsets commit in order per partition, so parallel ingest runs would only conflict.
INGEST_CONCURRENCY_TAG = "billing/ingest"


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    return {
        "kafka": KafkaResource(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            topic=settings.topic,
            consumer_group=settings.consumer_group,
            request_timeout_seconds=settings.kafka_request_timeout_s,
            topic_formats=settings.topic_formats,
        ),
        "lake": DeltaLakeResource(
            root=settings.lake_root,
            s3_endpoint_url=settings.s3_endpoint_url,
            aws_region=settings.aws_region,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
            s3_allow_http=settings.s3_allow_http,
        ),
        "postgres": PostgresServingResource(url=settings.postgres_url),
        "billing_rules": BillingRulesResource(
            supported_currencies=list(settings.supported_currencies),
            max_future_skew_seconds=settings.max_future_skew_s,
            schema_registry_url=settings.schema_registry_url,
        ),
    }


def build_definitions(settings: Settings) -> dg.Definitions:
    partitions = log_hour_partitions(settings.partitions_start)
    ingest_assets = build_ingest_assets(partitions)
    ingest_job = dg.define_asset_job(
        "ingest_billing_events",
        selection=[ingest_assets],
        tags={INGEST_CONCURRENCY_TAG: "kafka"},
        # One step per run: a separate step process would only add ~2 s of start-up.
        executor_def=dg.in_process_executor,
        description=(
            "One micro-batch: Kafka offsets to raw/, billing_events/ and quarantine/, exactly once."
        ),
    )
    sensor = build_kafka_offsets_sensor(
        ingest_job,
        op_name=INGEST_OP,
        interval_s=settings.sensor_interval_s,
        max_records_per_run=settings.max_records_per_run,
        start_from=settings.start_from,
    )
    return dg.Definitions(
        assets=[ingest_assets],
        jobs=[ingest_job],
        sensors=[sensor],
        resources=build_resources(settings),
    )


defs = build_definitions(load_settings())
