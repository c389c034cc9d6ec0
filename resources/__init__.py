"""Dagster resources: configuration plus a handle to one external system each."""

from resources.analytics import RevenueAnalyticsResource
from resources.kafka import KafkaResource
from resources.lake import DeltaLakeResource
from resources.oltp import OltpSourceResource
from resources.postgres import PostgresServingResource
from resources.rules import BillingRulesResource

__all__ = [
    "BillingRulesResource",
    "DeltaLakeResource",
    "KafkaResource",
    "OltpSourceResource",
    "PostgresServingResource",
    "RevenueAnalyticsResource",
]
