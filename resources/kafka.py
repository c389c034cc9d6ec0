from dagster import ConfigurableResource

from billing_dagster.decoding import ValueFormat
from billing_dagster.kafka_io import KafkaClient, KafkaSettings, kafka_topic_of


class KafkaResource(ConfigurableResource):
    """The billing-events Kafka cluster (any Kafka-protocol broker)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "billing-events"
    consumer_group: str = "billing-dagster"
    request_timeout_seconds: float = 10.0
    #: Value encoding per topic (json, avro, debezium-json); unlisted topics are json.
    topic_formats: dict[str, str] = {}  # noqa: RUF012 (pydantic copies defaults)

    def value_format(self, topic: str) -> ValueFormat:
        # A topic key (name@generation, billing_dagster/topic_identity.py) has its name's.
        return ValueFormat(self.topic_formats.get(kafka_topic_of(topic), ValueFormat.JSON.value))

    def client(self) -> KafkaClient:
        return KafkaClient(
            KafkaSettings(
                bootstrap_servers=self.bootstrap_servers,
                consumer_group=self.consumer_group,
                request_timeout_s=self.request_timeout_seconds,
            )
        )
