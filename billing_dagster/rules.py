"""Validation rules, defined once: each is a name, a vectorised test and a message.

A rule's `violated` expression is true on the rows that break it; `message` explains the
break for that row. `apply_rules` evaluates a rule set over a whole frame at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache

import polars as pl

from billing_dagster.contract import TRANSACTION_TYPES, WIRE_FIELDS


@dataclass(frozen=True)
class Rule:
    name: str
    violated: pl.Expr
    message: pl.Expr


def _text(column: str) -> pl.Expr:
    return pl.col(column).str.strip_chars()


def _present(column: str) -> pl.Expr:
    return _text(column).is_not_null() & (_text(column) != "")


#: How much of a value a message quotes: a reason names the value, it does not carry a
#: megabyte of it into logs and alerts.
QUOTE_CHARS = 64

#: Unicode control characters (C0, DEL, C1). No contract field has a use for them, and
#: Postgres cannot store NUL in text at all (COPY fails the whole batch on it).
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f]"
#: metadata is free text (often JSON): tab, line feed and carriage return are allowed there.
METADATA_CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"


def quoted(value: pl.Expr) -> pl.Expr:
    """`value` made safe to put in a reason: control characters replaced, cut to
    QUOTE_CHARS characters with an ellipsis."""
    safe = value.str.replace_all(CONTROL_CHARACTERS, "\ufffd")
    return (
        pl.when(safe.str.len_chars() > QUOTE_CHARS)
        .then(safe.str.slice(0, QUOTE_CHARS) + pl.lit("…"))
        .otherwise(safe)
    )


def _missing(column: str) -> Rule:
    return Rule(
        name=f"required:{column}",
        violated=~_present(column),
        message=pl.lit(f"missing required field {column}"),
    )


#: decimal(12,2) as text: ten integer digits at most, two fraction digits (trailing zeros
#: beyond the second are harmless and accepted, "12.300" is 12.30).
MONEY_PATTERN = r"^-?\d{1,10}(\.\d{1,2}0*|\.0*)?$"
CUSTOMER_ID_PATTERN = r"^\d{1,18}$"
#: A number written with an exponent (1e3, 1.5E2, 2e-1): never a contract value.
EXPONENT_PATTERN = r"^\s*[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+\s*$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%#z"
#: Event times before the Unix epoch are not billing events (year 0 parses as a date).
#: Judged on the text (years 0000-1969), so the timestamp is not parsed one more time.
BEFORE_EPOCH_PATTERN = r"^\s*(0\d{3}|1[0-8]\d{2}|19[0-6]\d)-"


def parse_timestamp(column: str) -> pl.Expr:
    return _text(column).str.to_datetime(
        format=TIMESTAMP_FORMAT, strict=False, time_zone="UTC", time_unit="us"
    )


def _exponent(column: str) -> pl.Expr:
    return pl.col(column).str.contains(EXPONENT_PATTERN).fill_null(False)


def _money_rule(column: str) -> Rule:
    # Absence is the business of a `required:` rule; this one judges values that are there.
    # The text is the number as written (decoding.py keeps a JSON number's literal), so
    # 10.0000000000000001 is refused here rather than rounded through a float.
    return Rule(
        name=f"decimal_12_2:{column}",
        violated=_present(column) & ~_text(column).str.contains(MONEY_PATTERN) & ~_exponent(column),
        message=pl.format(
            f"{column} must be a decimal(12,2) (at most 10 integer and 2 fraction digits), "
            "got '{}'",
            quoted(pl.col(column)),
        ),
    )


@dataclass(frozen=True)
class ContractLimits:
    """Sizes a record and its fields may have (settings BILLING_MAX_EVENT_ID_LENGTH,
    BILLING_MAX_METADATA_BYTES, BILLING_MAX_RECORD_BYTES)."""

    max_event_id_length: int = 128
    max_metadata_bytes: int = 64 * 1024
    #: Larger record values are quarantined before any decoding is attempted.
    max_record_bytes: int = 1024 * 1024


DEFAULT_LIMITS = ContractLimits()

#: How deep arrays and objects may nest in a JSON record (a billing event needs 1; a
#: Debezium envelope with its schema about 6). Deeper records are quarantined before the
#: decoders, whose recursion they would exhaust. Not a setting: no producer needs more.
MAX_NESTING_DEPTH = 64


def _control_character_rule() -> Rule:
    def found(column: str) -> tuple[pl.Expr, pl.Expr]:
        pattern = METADATA_CONTROL_CHARACTERS if column == "metadata" else CONTROL_CHARACTERS
        first = pl.col(column).str.extract(f"({pattern})")
        # The last byte of a C0/DEL/C1 character's UTF-8 form is its code point's low byte.
        code = first.str.encode("hex").str.slice(-2).str.to_uppercase()
        where = pl.col(column).str.find(pattern)
        message = pl.format(
            f"{column} contains control character U+00{{}} at byte {{}}",
            code,
            where,
        )
        return pl.col(column).str.contains(pattern).fill_null(False), message

    checks = [found(column) for column in WIRE_FIELDS]
    return Rule(
        name="text:control_character",
        violated=pl.any_horizontal([hit for hit, _ in checks]),
        message=pl.concat_list([pl.when(hit).then(message) for hit, message in checks])
        .list.drop_nulls()
        .list.join("; ")
        + pl.lit(
            " (Postgres cannot store NUL; no contract field has a use for control characters)"
        ),
    )


def _size_rule(name: str, column: str, size: pl.Expr, limit: int, unit: str, setting: str) -> Rule:
    return Rule(
        name=name,
        violated=(size > limit).fill_null(False),
        message=pl.format(
            f"{column} is {{}} {unit}, more than the {limit} allowed ({setting}), starting '{{}}'",
            size,
            quoted(pl.col(column)),
        ),
    )


@cache
def contract_rules(limits: ContractLimits = DEFAULT_LIMITS) -> tuple[Rule, ...]:
    """Conformance of a decoded record to the BillingEvent contract, with these limits.
    Business rules (issue #3: sign by type, supported currencies, refunds needing a
    payment) are a separate set."""
    return (
        _missing("event_id"),
        _size_rule(
            "limit:event_id_length",
            "event_id",
            pl.col("event_id").str.len_chars(),
            limits.max_event_id_length,
            "characters",
            "BILLING_MAX_EVENT_ID_LENGTH",
        ),
        _missing("customer_id"),
        Rule(
            name="integer:customer_id",
            violated=_present("customer_id")
            & ~_text("customer_id").str.contains(CUSTOMER_ID_PATTERN)
            & ~_exponent("customer_id"),
            message=pl.format(
                "customer_id must be a positive integer, got '{}'",
                quoted(pl.col("customer_id")),
            ),
        ),
        _missing("transaction_type"),
        Rule(
            name="enum:transaction_type",
            violated=_present("transaction_type")
            & ~_text("transaction_type").str.to_uppercase().is_in(TRANSACTION_TYPES),
            message=pl.format(
                f"transaction_type must be one of {', '.join(TRANSACTION_TYPES)}, got '{{}}'",
                quoted(pl.col("transaction_type")),
            ),
        ),
        _missing("amount"),
        _money_rule("amount"),
        _money_rule("tax_amount"),
        Rule(
            name="number:exponent",
            violated=pl.any_horizontal(
                [_exponent(c) for c in ("amount", "tax_amount", "customer_id")]
            ),
            message=pl.concat_list(
                [
                    pl.when(_exponent(c)).then(
                        pl.format(f"{c} is written with an exponent ('{{}}')", quoted(pl.col(c)))
                    )
                    for c in ("amount", "tax_amount", "customer_id")
                ]
            )
            .list.drop_nulls()
            .list.join("; ")
            + pl.lit(': send money as a plain decimal ("150.00") and customer_id as digits'),
        ),
        Rule(
            name="format:currency",
            violated=_present("currency") & ~_text("currency").str.contains(CURRENCY_PATTERN),
            message=pl.format(
                "currency must be a three-letter upper-case ISO 4217 code, got '{}'",
                quoted(pl.col("currency")),
            ),
        ),
        Rule(
            name="timestamp:created_at",
            violated=_present("created_at") & parse_timestamp("created_at").is_null(),
            message=pl.format(
                "created_at must be an ISO-8601 timestamp with a zone "
                "(2026-11-24T13:05:00.123Z), got '{}'",
                quoted(pl.col("created_at")),
            ),
        ),
        Rule(
            name="timestamp:range",
            violated=pl.col("created_at").str.contains(BEFORE_EPOCH_PATTERN).fill_null(False),
            message=pl.format(
                "created_at '{}' is before 1970-01-01T00:00:00Z: not a plausible event time",
                quoted(pl.col("created_at")),
            ),
        ),
        _size_rule(
            "limit:metadata_bytes",
            "metadata",
            pl.col("metadata").str.len_bytes(),
            limits.max_metadata_bytes,
            "bytes",
            "BILLING_MAX_METADATA_BYTES",
        ),
        _control_character_rule(),
    )


#: The contract rules with the default limits.
CONTRACT_RULES: tuple[Rule, ...] = contract_rules()


def apply_rules(frame: pl.DataFrame, rules: Sequence[Rule]) -> pl.DataFrame:
    """Add `rules` (names broken, as a list) and `reason` (their messages joined) columns.

    Rows breaking no rule get an empty list and a null reason.
    """
    no_rules = {
        "rules": pl.lit([], dtype=pl.List(pl.String)),
        "reason": pl.lit(None, dtype=pl.String),
    }
    if not rules:
        return frame.with_columns(**no_rules)
    broken = frame.select(
        pl.any_horizontal([r.violated.fill_null(True) for r in rules]).alias("_broken")
    ).to_series()
    if not broken.any():
        return frame.with_columns(**no_rules)
    # Names and messages only for the rows that break something: built for every row,
    # the per-rule lists and formatted messages cost more than all the checks together.
    names = pl.concat_list(
        [pl.when(r.violated.fill_null(True)).then(pl.lit(r.name)) for r in rules]
    ).list.drop_nulls()
    messages = pl.concat_list(
        [pl.when(r.violated.fill_null(True)).then(r.message.fill_null(r.name)) for r in rules]
    ).list.drop_nulls()
    indexed = frame.with_columns(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_order"))
    passing = indexed.filter(~broken).with_columns(**no_rules)
    judged = indexed.filter(broken).with_columns(rules=names, reason=messages.list.join("; "))
    return pl.concat([passing, judged]).sort("_order").drop("_order")


# ---- business rules (over typed, enriched events) -----------------------------------

DEFAULT_SUPPORTED_CURRENCIES: tuple[str, ...] = ("USD", "EUR", "GBP", "CAD", "AUD", "JPY", "CHF")
DEFAULT_MAX_FUTURE_SKEW = timedelta(minutes=15)

#: May carry a negative amount: money going back to the customer (REFUND, CHARGEBACK), and
#: ADJUSTMENT, which is a correction in either direction (a credit is negative).
RETURN_TYPES: tuple[str, ...] = ("REFUND", "CHARGEBACK")


@dataclass(frozen=True)
class ValidationPolicy:
    supported_currencies: tuple[str, ...] = DEFAULT_SUPPORTED_CURRENCIES
    #: How far created_at may run ahead of the record's Kafka timestamp. Judged against the
    #: Kafka timestamp, not the clock, so a replay next month decides exactly as today.
    max_future_skew: timedelta = DEFAULT_MAX_FUTURE_SKEW


def _type_is(*names: str) -> pl.Expr:
    return pl.col("transaction_type").is_in(list(names))


def business_rules(policy: ValidationPolicy) -> tuple[Rule, ...]:
    """Rules on decoded events; `reference:` ones read the enrichment columns."""
    supported = sorted(set(policy.supported_currencies))
    skew_seconds = int(policy.max_future_skew.total_seconds())
    zero = pl.lit(0)
    return (
        Rule(
            name="sign:payment_positive",
            violated=_type_is("PAYMENT") & (pl.col("amount") <= zero),
            message=pl.format("PAYMENT amount must be positive, got {}", pl.col("amount")),
        ),
        Rule(
            name="sign:return_negative",
            violated=_type_is(*RETURN_TYPES) & (pl.col("amount") >= zero),
            message=pl.format(
                "{} amount must be negative (money returned to the customer), got {}",
                pl.col("transaction_type"),
                pl.col("amount"),
            ),
        ),
        Rule(
            name="sign:adjustment_nonzero",
            violated=_type_is("ADJUSTMENT") & (pl.col("amount") == zero),
            message=pl.lit("ADJUSTMENT amount must not be zero"),
        ),
        Rule(
            name="tax:within_amount",
            violated=pl.col("tax_amount").is_not_null()
            & (
                ((pl.col("tax_amount") < zero) & (pl.col("amount") > zero))
                | ((pl.col("tax_amount") > zero) & (pl.col("amount") < zero))
                | (pl.col("tax_amount").abs() > pl.col("amount").abs())
            ),
            message=pl.format(
                "tax_amount {} must have the sign of amount {} and not exceed it",
                pl.col("tax_amount"),
                pl.col("amount"),
            ),
        ),
        Rule(
            name="currency:supported",
            violated=~pl.col("currency").is_in(supported),
            message=pl.format(
                f"unsupported currency {{}} (supported: {', '.join(supported)})",
                pl.col("currency"),
            ),
        ),
        Rule(
            name="time:future",
            violated=pl.col("created_at")
            > pl.col("kafka_timestamp") + pl.duration(seconds=skew_seconds),
            message=pl.format(
                f"created_at {{}} is more than {skew_seconds} s after the record's Kafka "
                "timestamp {}",
                pl.col("created_at"),
                pl.col("kafka_timestamp"),
            ),
        ),
        Rule(
            name="reference:customer",
            violated=pl.col("customer_tier").is_null(),
            message=pl.format("customer {} is not in reference/customers", pl.col("customer_id")),
        ),
        Rule(
            name="reference:subscription",
            violated=pl.col("customer_tier").is_not_null() & pl.col("subscription_plan").is_null(),
            message=pl.format(
                "customer {} has no subscription started at or before {}",
                pl.col("customer_id"),
                pl.col("created_at"),
            ),
        ),
        Rule(
            name="reference:fx_rate",
            violated=pl.col("currency").is_in(supported) & pl.col("usd_rate").is_null(),
            message=pl.format(
                "no USD rate for {} on {} in reference/fx_rates",
                pl.col("currency"),
                pl.col("created_at").dt.date(),
            ),
        ),
        Rule(
            name="decimal_12_2:amount_usd",
            violated=pl.col("usd_rate").is_not_null() & pl.col("amount_usd").is_null(),
            message=pl.format(
                "amount {} {} at rate {} exceeds decimal(12,2) in USD",
                pl.col("amount"),
                pl.col("currency"),
                pl.col("usd_rate"),
            ),
        ),
    )


#: Judged after the other rules, because an original payment must itself be acceptable.
ORIGINAL_PAYMENT_RULE = Rule(
    name="refund:original_payment",
    violated=_type_is(*RETURN_TYPES) & ~pl.col("_has_original_payment").fill_null(False),
    message=pl.format(
        "{} for customer {} has no accepted PAYMENT at or before {}",
        pl.col("transaction_type"),
        pl.col("customer_id"),
        pl.col("created_at"),
    ),
)
