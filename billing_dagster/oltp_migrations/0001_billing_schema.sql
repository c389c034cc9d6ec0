-- The OLTP billing schema the workload generator writes and Debezium captures.
-- Money is NUMERIC(12,2) (Decimal(12,2) end to end). Rows of transactions, payments and
-- refunds are immutable: a correction is a new ADJUSTMENT transaction, never an UPDATE.
CREATE SCHEMA IF NOT EXISTS billing;

CREATE TABLE billing.subscriptions (
    subscription_id      UUID PRIMARY KEY,
    customer_id          BIGINT NOT NULL,
    plan                 TEXT NOT NULL,
    price                NUMERIC(12,2) NOT NULL CHECK (price >= 0),
    currency             CHAR(3) NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('active', 'cancelled')),
    current_period_start DATE NOT NULL,
    current_period_end   DATE NOT NULL CHECK (current_period_end > current_period_start),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE billing.invoices (
    invoice_id      UUID PRIMARY KEY,
    subscription_id UUID REFERENCES billing.subscriptions,
    customer_id     BIGINT NOT NULL,
    amount          NUMERIC(12,2) NOT NULL,
    tax_amount      NUMERIC(12,2),
    currency        CHAR(3) NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('open', 'paid', 'void')),
    issued_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    paid_at         TIMESTAMPTZ
);

CREATE TABLE billing.transactions (
    transaction_id   UUID PRIMARY KEY,
    customer_id      BIGINT NOT NULL,
    subscription_id  UUID REFERENCES billing.subscriptions,
    transaction_type TEXT NOT NULL
        CHECK (transaction_type IN ('PAYMENT', 'REFUND', 'CHARGEBACK', 'ADJUSTMENT')),
    amount           NUMERIC(12,2) NOT NULL,
    currency         CHAR(3) NOT NULL,
    tax_amount       NUMERIC(12,2),
    metadata         JSONB,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE billing.payments (
    payment_id  UUID PRIMARY KEY,
    invoice_id  UUID REFERENCES billing.invoices,
    customer_id BIGINT NOT NULL,
    amount      NUMERIC(12,2) NOT NULL CHECK (amount > 0),
    tax_amount  NUMERIC(12,2),
    currency    CHAR(3) NOT NULL,
    method      TEXT NOT NULL DEFAULT 'card',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A refund or chargeback returns (part of) an earlier payment; amounts are positive here
-- and negative as billing events.
CREATE TABLE billing.refunds (
    refund_id   UUID PRIMARY KEY,
    payment_id  UUID NOT NULL REFERENCES billing.payments,
    customer_id BIGINT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('refund', 'chargeback')),
    amount      NUMERIC(12,2) NOT NULL CHECK (amount > 0),
    tax_amount  NUMERIC(12,2),
    currency    CHAR(3) NOT NULL,
    reason      TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX transactions_created_at ON billing.transactions (created_at);
CREATE INDEX payments_created_at ON billing.payments (created_at);
CREATE INDEX refunds_created_at ON billing.refunds (created_at);
