-- The serving layer of the reference design: balances and monthly-partitioned history.
CREATE TYPE transaction_type_enum AS ENUM ('PAYMENT', 'REFUND', 'CHARGEBACK', 'ADJUSTMENT');

-- One balance per customer, in USD (the sum of amount_usd of the customer's accepted events).
CREATE TABLE customer_balances (
    customer_id BIGINT PRIMARY KEY,
    current_balance DECIMAL(12,2) NOT NULL,
    currency VARCHAR(3) NOT NULL,
    last_updated TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    version BIGINT DEFAULT 1
);

-- A partitioned table's primary key must include the partition key; created_at is part of
-- the event, so (transaction_id, created_at) is as unique as transaction_id.
CREATE TABLE transaction_history (
    transaction_id UUID NOT NULL,
    customer_id BIGINT NOT NULL,
    amount DECIMAL(12,2) NOT NULL,
    transaction_type transaction_type_enum NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    currency VARCHAR(3) NOT NULL,
    amount_usd DECIMAL(12,2) NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (transaction_id, created_at)
) PARTITION BY RANGE (created_at);

-- Exactly-once: the next Kafka offset per partition whose accepted events are in the
-- balances, advanced in the same transaction as the balances themselves.
CREATE TABLE balance_offsets (
    topic TEXT NOT NULL,
    kafka_partition INT NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (topic, kafka_partition)
);

-- The ledger: every batch applied, with its identity (offset ranges) and what it changed.
CREATE TABLE balance_batches (
    batch_id TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    offset_ranges JSONB NOT NULL,
    run_id TEXT NOT NULL,
    events_applied INT NOT NULL,
    customers_updated INT NOT NULL,
    amount_usd_total DECIMAL(14,2) NOT NULL,
    applied_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
