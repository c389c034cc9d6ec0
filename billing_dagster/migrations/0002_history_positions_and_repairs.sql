-- Postgres as a projection of billing_events (docs/architecture.md, "Exactly once"):
-- each history row names the Kafka position it was accepted at, so transaction_history
-- doubles as the dedupe index (an earlier delivery's position tells a retry from a
-- redelivery), and the ledger tells a batch from a repair applied from billing_events.
ALTER TABLE transaction_history
    ADD COLUMN kafka_topic TEXT,
    ADD COLUMN kafka_partition INT,
    ADD COLUMN kafka_offset BIGINT;

ALTER TABLE balance_batches
    ADD COLUMN kind TEXT NOT NULL DEFAULT 'batch' CHECK (kind IN ('batch', 'repair')),
    ALTER COLUMN amount_usd_total TYPE DECIMAL(20,2);

CREATE INDEX balance_batches_applied_at ON balance_batches (applied_at);
