-- Which Kafka topic the serving marks belong to (docs/runbooks/topic-recreated.md).
-- balance_offsets, transaction_history.kafka_topic and the ledger name a topic *key*: the
-- Kafka topic name, or `<name>@<generation>` once a recreated topic was adopted. Each key's
-- marks belong to one Kafka topic ID, recorded here on first sight, so a serving database
-- whose marks belong to another topic of the same name is refused, not applied over.
CREATE TABLE topic_identity (
    topic_key TEXT PRIMARY KEY,
    kafka_topic TEXT NOT NULL,
    generation INT NOT NULL,
    topic_id TEXT NOT NULL,
    recorded_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
