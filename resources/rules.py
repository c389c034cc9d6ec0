from datetime import timedelta
from decimal import Decimal

from dagster import ConfigurableResource

from billing_dagster.circuit_breaker import BreakerPolicy
from billing_dagster.decoding import ValueFormat
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.enrichment import load_reference_data
from billing_dagster.ingest import CleaningContext
from billing_dagster.rules import (
    DEFAULT_LIMITS,
    DEFAULT_SUPPORTED_CURRENCIES,
    ContractLimits,
    ValidationPolicy,
)


class BillingRulesResource(ConfigurableResource):
    """The business rules' settings, the reference tables and the Schema Registry."""

    supported_currencies: list[str] = list(DEFAULT_SUPPORTED_CURRENCIES)  # noqa: RUF012
    max_future_skew_seconds: int = 900
    schema_registry_url: str | None = None
    #: Two deliveries of one event_id this far apart in event time are still one event
    #: (at least the topic's retention: a redelivery can come from anywhere in it).
    dedupe_horizon_days: int = 7
    #: The circuit breaker: a rule failing more than this percent of a batch's records,
    #: and at least `circuit_breaker_min_records` of them, holds the batch.
    circuit_breaker_percent: str = "5"
    circuit_breaker_min_records: int = 20
    #: Contract limits: longer event_ids, larger metadata and larger records are
    #: quarantined (BILLING_MAX_EVENT_ID_LENGTH, _METADATA_BYTES, _RECORD_BYTES).
    max_event_id_length: int = DEFAULT_LIMITS.max_event_id_length
    max_metadata_bytes: int = DEFAULT_LIMITS.max_metadata_bytes
    max_record_bytes: int = DEFAULT_LIMITS.max_record_bytes

    def policy(self) -> ValidationPolicy:
        return ValidationPolicy(
            supported_currencies=tuple(self.supported_currencies),
            max_future_skew=timedelta(seconds=self.max_future_skew_seconds),
        )

    def cleaning_context(self, lake: LakeLocation, value_format: ValueFormat) -> CleaningContext:
        registry = None
        if value_format is ValueFormat.AVRO:
            from billing_dagster.avro_format import SchemaRegistrySource

            if not self.schema_registry_url:
                raise ValueError("Avro topics need BILLING_SCHEMA_REGISTRY_URL")
            registry = SchemaRegistrySource(self.schema_registry_url)
        return CleaningContext(
            reference=load_reference_data(lake),
            policy=self.policy(),
            value_format=value_format,
            registry=registry,
            dedupe_horizon=timedelta(days=self.dedupe_horizon_days),
            breaker=BreakerPolicy(
                percent=Decimal(self.circuit_breaker_percent),
                min_records=self.circuit_breaker_min_records,
            ),
            limits=ContractLimits(
                max_event_id_length=self.max_event_id_length,
                max_metadata_bytes=self.max_metadata_bytes,
                max_record_bytes=self.max_record_bytes,
            ),
        )
