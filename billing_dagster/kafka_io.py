"""Reading exact offset ranges from Kafka with assigned partitions (never group subscribe).

Group subscription hands partitions out at the broker's discretion; a micro-batch must
read exactly the offsets it was asked for, so partitions are assigned explicitly and the
consumer group is used only to publish committed offsets (lag for ordinary Kafka tools).

Every method takes a topic *key*: the Kafka topic name, or `<name>@<generation>` once a
recreated topic was adopted (billing_dagster/topic_identity.py). Kafka is asked under the
name; the records read carry the key in `kafka_topic`, so positions of two topics of the
same name never collide in the lake or in Postgres.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from billing_dagster.kafka_records import error_events, records_below, records_frame
from billing_dagster.offsets import OffsetRange

#: Leadership is settling (a new topic, a broker restart). librdkafka does not flag all of
#: these as retriable, but they pass within moments.
TRANSIENT_ERRORS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


class KafkaUnavailableError(RuntimeError):
    """The broker cannot be reached, or the topic does not exist."""


class KafkaReadError(RuntimeError):
    """Offsets that were asked for could not be read."""


class OffsetsLostError(KafkaReadError):
    """Offsets were deleted by retention before they were processed; retrying cannot help."""

    def __init__(self, message: str, *, partition: int, offset: int | None) -> None:
        super().__init__(message)
        self.partition = partition
        self.offset = offset


#: Kafka topic names cannot contain it, so `<topic>@<n>` names generation n of a topic.
GENERATION_SEPARATOR = "@"
#: Broker-assigned times: the log's timestamps then only grow, so an hour of the log is a
#: contiguous offset range (CreateTime takes whatever the producer says).
LOG_APPEND_TIME = "LogAppendTime"


#: Most messages one consume() call hands over (a read asks for fewer near its end).
CONSUME_BATCH = 20_000


def kafka_topic_of(key: str) -> str:
    """The Kafka topic name of a topic key (`billing-events@2` -> `billing-events`)."""
    return key.split(GENERATION_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    consumer_group: str = "billing-dagster"
    client_id: str = "billing-dagster"
    request_timeout_s: float = 10.0


#: librdkafka's own log lines (connection refused, retries) go here, not to raw stderr: the
#: Dagster runs show them, and the CLI reports an unreachable broker as one line instead.
LIBRDKAFKA_LOG = logging.getLogger("billing_dagster.librdkafka")


def _consumer_config(settings: KafkaSettings) -> dict[str, object]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "logger": LIBRDKAFKA_LOG,
        "group.id": settings.consumer_group,
        "client.id": settings.client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        # Offsets deleted by retention must fail loudly, never be skipped silently.
        "auto.offset.reset": "error",
        "socket.timeout.ms": int(settings.request_timeout_s * 1000),
        "fetch.max.bytes": 64 * 1024 * 1024,
        "max.partition.fetch.bytes": 8 * 1024 * 1024,
        "queued.max.messages.kbytes": 256 * 1024,
    }


class KafkaClient:
    """A short-lived consumer for offset queries, range reads and offset commits."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._consumer = Consumer(_consumer_config(settings))
        self._admin: AdminClient | None = None

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(
                {
                    "bootstrap.servers": self.settings.bootstrap_servers,
                    "logger": LIBRDKAFKA_LOG,
                    "client.id": self.settings.client_id,
                    "socket.timeout.ms": int(self.settings.request_timeout_s * 1000),
                }
            )
        return self._admin

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> KafkaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partitions(self, topic: str) -> list[int]:
        topic = kafka_topic_of(topic)
        try:
            metadata = self._consumer.list_topics(topic, timeout=self.settings.request_timeout_s)
        except KafkaException as exc:
            raise KafkaUnavailableError(
                f"cannot reach Kafka at {self.settings.bootstrap_servers}: {exc.args[0]}"
            ) from exc
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise KafkaUnavailableError(
                f"topic '{topic}' does not exist on {self.settings.bootstrap_servers}"
            )
        return sorted(described.partitions)

    def watermarks(self, topic: str) -> dict[int, tuple[int, int]]:
        """{partition: (low, high)}: the first retained offset and the next offset to write."""
        topic = kafka_topic_of(topic)
        result = {}
        for partition in self.partitions(topic):
            deadline = time.monotonic() + self.settings.request_timeout_s
            while partition not in result:
                try:
                    result[partition] = self._consumer.get_watermark_offsets(
                        TopicPartition(topic, partition),
                        timeout=self.settings.request_timeout_s,
                        cached=False,
                    )
                except KafkaException as exc:
                    error = exc.args[0]
                    transient = error.retriable() or error.code() in TRANSIENT_ERRORS
                    if transient and time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    raise KafkaUnavailableError(
                        f"cannot read offsets of {topic}/{partition} from "
                        f"{self.settings.bootstrap_servers}: {error}"
                    ) from exc
        return result

    def topic_id(self, topic: str) -> str | None:
        """The topic's Kafka topic ID (base64, as Kafka's tools print it): a topic deleted
        and created again under the same name gets a new one. None: the broker reports
        none (an all-zero ID)."""
        topic = kafka_topic_of(topic)
        future = self._admin_client().describe_topics(
            TopicCollection([topic]), request_timeout=self.settings.request_timeout_s
        )[topic]
        try:
            described = future.result(timeout=self.settings.request_timeout_s + 5)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise KafkaUnavailableError(
                    f"topic '{topic}' does not exist on {self.settings.bootstrap_servers}"
                ) from None
            raise KafkaUnavailableError(
                f"cannot describe topic '{topic}' on {self.settings.bootstrap_servers}: {error}"
            ) from None
        uuid = described.topic_id
        if uuid is None or not (
            uuid.get_most_significant_bits() or uuid.get_least_significant_bits()
        ):
            return None
        return str(uuid)

    def timestamp_type(self, topic: str) -> str | None:
        """`message.timestamp.type` of the topic (CreateTime or LogAppendTime); None when
        the broker does not say."""
        resource = ConfigResource(ResourceType.TOPIC, kafka_topic_of(topic))
        try:
            configs = (
                self._admin_client()
                .describe_configs([resource], request_timeout=self.settings.request_timeout_s)[
                    resource
                ]
                .result(timeout=self.settings.request_timeout_s + 5)
            )
        except KafkaException:
            return None
        entry = configs.get("message.timestamp.type")
        return entry.value if entry is not None else None

    def end_offsets(self, topic: str) -> dict[int, int]:
        return {p: high for p, (_, high) in self.watermarks(topic).items()}

    def offsets_for_time(self, topic: str, moment: datetime) -> dict[int, int | None]:
        """{partition: first offset whose timestamp >= moment}, None where there is none yet."""
        millis = int(moment.astimezone(UTC).timestamp() * 1000)
        topic = kafka_topic_of(topic)
        query = [TopicPartition(topic, p, millis) for p in self.partitions(topic)]
        try:
            found = self._consumer.offsets_for_times(query, timeout=self.settings.request_timeout_s)
        except KafkaException as exc:
            raise KafkaUnavailableError(
                f"cannot look up offsets by time on {topic}: {exc.args[0]}"
            ) from exc
        return {tp.partition: (None if tp.offset < 0 else tp.offset) for tp in found}

    def read(
        self, topic: str, ranges: Iterable[OffsetRange], *, timeout_s: float = 120.0
    ) -> tuple[pl.DataFrame, dict[int, int]]:
        """Read exactly the given ranges.

        Returns the records and, per partition, the offset reading stopped at: the range
        end, or the log end if the log ends sooner (offsets past the log end are not
        claimed as read). `kafka_topic` of the records is `topic` as given (the key).
        """
        key, topic = topic, kafka_topic_of(topic)
        pending = {r.partition: r for r in ranges if r.size > 0}
        reached = {p: r.start for p, r in pending.items()}
        chunks: list[pl.DataFrame] = []
        if not pending:
            return records_frame(key, chunks), reached
        consumer = self._consumer
        consumer.assign([TopicPartition(topic, p, r.start) for p, r in pending.items()])
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                if time.monotonic() > deadline:
                    left = ", ".join(f"{p}@{reached[p]}..{r.end}" for p, r in pending.items())
                    raise KafkaReadError(f"timed out reading {topic}; still pending: {left}")
                # consume() returns once it has num_messages or its timeout passed: asking
                # for no more than the ranges still hold ends the last call when they are in.
                expected = sum(r.end - reached[p] for p, r in pending.items())
                messages = consumer.consume(min(CONSUME_BATCH, expected), timeout=0.5)
                chunks.extend(self._take(topic, messages, pending, reached))
        finally:
            # Pausing outlives unassign() in librdkafka: resume, or the next read stalls.
            assigned = consumer.assignment()
            if assigned:
                consumer.resume(assigned)
            consumer.unassign()
        return records_frame(key, chunks), reached

    def _take(
        self,
        topic: str,
        messages: list[Message],
        pending: dict[int, OffsetRange],
        reached: dict[int, int],
    ) -> list[pl.DataFrame]:
        """The records of one consume() call inside the pending ranges; its error events
        (partition EOF, lost offsets, failures) are handled in their place among them."""
        errors, at = error_events(messages)
        chunks, start = [], 0
        for index in [*at, len(messages)]:
            if index > start and pending:
                chunk, after = records_below(
                    messages[start:index], {p: r.end for p, r in pending.items()}
                )
                chunks.append(chunk)
                for partition, offset in after.items():
                    reached[partition] = offset
                    if offset >= pending[partition].end:
                        self._finish(topic, partition, pending)
            if index < len(messages):
                self._on_error(topic, messages[index], errors[index], pending, reached)
            start = index + 1
        return chunks

    def _on_error(
        self,
        topic: str,
        message: Message,
        error: KafkaError,
        pending: dict[int, OffsetRange],
        reached: dict[int, int],
    ) -> None:
        partition = message.partition()
        if error.code() == KafkaError._PARTITION_EOF:
            wanted = pending.get(partition)
            if wanted is not None:
                reached[partition] = min(wanted.end, max(reached[partition], message.offset()))
                self._finish(topic, partition, pending)
            return
        if error.code() == KafkaError._AUTO_OFFSET_RESET:
            raise OffsetsLostError(
                f"offsets of {topic}/{partition} from {reached.get(partition)} "
                "are no longer in Kafka (deleted by retention before they were "
                "processed); replay them from their source",
                partition=partition,
                offset=reached.get(partition),
            )
        raise KafkaReadError(f"error reading {topic}/{partition}: {error}")

    def _finish(self, topic: str, partition: int, pending: dict[int, OffsetRange]) -> None:
        pending.pop(partition, None)
        self._consumer.pause([TopicPartition(topic, partition)])

    def commit(self, topic: str, offsets: Mapping[int, int]) -> None:
        """Publish processed offsets to the consumer group (next offset to read)."""
        topic = kafka_topic_of(topic)
        if offsets:
            self._consumer.commit(
                offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
                asynchronous=False,
            )

    def committed(self, topic: str) -> dict[int, int | None]:
        topic = kafka_topic_of(topic)
        query = [TopicPartition(topic, p) for p in self.partitions(topic)]
        found = self._consumer.committed(query, timeout=self.settings.request_timeout_s)
        return {tp.partition: (None if tp.offset < 0 else tp.offset) for tp in found}


def ensure_topic(
    bootstrap_servers: str,
    topic: str,
    *,
    partitions: int = 24,
    retention_ms: int = 7 * 24 * 3600 * 1000,
    timestamp_type: str = LOG_APPEND_TIME,
    timeout_s: float = 30.0,
) -> bool:
    """Create the topic if it is missing. Returns True when it was created.

    LogAppendTime by default: the broker stamps each record, so the time index only grows
    and every log hour maps to the same offsets at any later time (a producer's clock, or
    one future-dated record, cannot move records out of their hour). CreateTime is for
    tests that place records in past hours."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    existing = admin.list_topics(timeout=timeout_s).topics
    if topic in existing:
        return False
    futures = admin.create_topics(
        [
            NewTopic(
                topic,
                num_partitions=partitions,
                replication_factor=1,
                config={
                    "retention.ms": str(retention_ms),
                    "message.timestamp.type": timestamp_type,
                },
            )
        ],
        operation_timeout=timeout_s,
    )
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
        return False
    # A new topic's partitions answer only once each has a leader.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if (
            described
            and described.partitions
            and all(p.leader >= 0 and p.error is None for p in described.partitions.values())
        ):
            break
        time.sleep(0.1)
    return True


__all__ = [
    "GENERATION_SEPARATOR",
    "LOG_APPEND_TIME",
    "KafkaClient",
    "KafkaReadError",
    "KafkaSettings",
    "KafkaUnavailableError",
    "ensure_topic",
    "kafka_topic_of",
]
