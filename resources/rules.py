from datetime import timedelta

from dagster import ConfigurableResource

from billing_dagster.decoding import ValueFormat
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.enrichment import load_reference_data
from billing_dagster.ingest import CleaningContext
from billing_dagster.rules import DEFAULT_SUPPORTED_CURRENCIES, ValidationPolicy


class BillingRulesResource(ConfigurableResource):
    """The business rules' settings, the reference tables and the Schema Registry."""

    supported_currencies: list[str] = list(DEFAULT_SUPPORTED_CURRENCIES)  # noqa: RUF012
    max_future_skew_seconds: int = 900
    schema_registry_url: str | None = None
    #: Two deliveries of one event_id this far apart in event time are still one event
    #: (at least the topic's retention: a redelivery can come from anywhere in it).
    dedupe_horizon_days: int = 7

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
        )
