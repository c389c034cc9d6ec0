"""Produce synthetic billing events to Kafka at a steady rate."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from confluent_kafka import Producer

from billing_dagster.pacing import run_at_rate
from billing_dagster.synthetic import GeneratedRecord, SyntheticBillingStream
from billing_dagster.workload import Activity, billing_events_of


def make_producer(bootstrap_servers: str, *, single_record_batches: bool = False) -> Producer:
    config: dict[str, object] = {
        "bootstrap.servers": bootstrap_servers,
        "client.id": "billing-dagster-producer",
        # Idempotent: a retried send never lands twice in the log.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 10,
        "batch.size": 65536,
        # Java's default partitioner, so a customer's events land where Java clients put them.
        "partitioner": "murmur2_random",
    }
    if single_record_batches:
        # Tansu (the embedded demo broker) reports end offsets per batch, not per record.
        config["batch.num.messages"] = 1
    else:
        config["compression.type"] = "lz4"
    return Producer(config)


def send_value(producer: Producer, topic: str, key: bytes, value: bytes | None) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value)
            return
        except BufferError:  # local queue full: let deliveries drain, then retry
            producer.poll(0.05)


def send(producer: Producer, topic: str, record: GeneratedRecord) -> None:
    send_value(producer, topic, record.key, record.value)


def produce_records(producer: Producer, topic: str, records: Iterable[GeneratedRecord]) -> Counter:
    counts: Counter = Counter()
    for record in records:
        send(producer, topic, record)
        counts[record.kind] += 1
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"{remaining} records were not acknowledged by Kafka")
    return counts


def produce_at_rate(
    producer: Producer,
    topic: str,
    stream: SyntheticBillingStream,
    *,
    rate: float,
    count: int | None = None,
    duration_s: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[Counter], None] = lambda _: None,
) -> Counter:
    """Send `rate` events a second until `count` events or `duration_s` seconds."""

    def write(records: list[GeneratedRecord]) -> None:
        for record in records:
            send(producer, topic, record)
        producer.poll(0)

    counts = run_at_rate(
        stream.records,
        write,
        lambda record: record.kind,
        rate=rate,
        count=count,
        duration_s=duration_s,
        should_stop=should_stop,
        on_progress=on_progress,
    )
    producer.flush(60)
    return counts


def billing_event_writer(producer: Producer, topic: str) -> Callable[[list[Activity]], None]:
    """Writes workload activities' billing events straight to Kafka (no OLTP, no CDC), for
    `workload.run_at_rate`; flush the producer when done."""

    def write(batch: list[Activity]) -> None:
        for key, value in billing_events_of(batch):
            send_value(producer, topic, key, value)
        producer.poll(0)

    return write
