"""Validation rules, defined once: each is a name, a vectorised test and a message.

A rule's `violated` expression is true on the rows that break it; `message` explains the
break for that row. `apply_rules` evaluates a rule set over a whole frame at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from billing_dagster.contract import TRANSACTION_TYPES


@dataclass(frozen=True)
class Rule:
    name: str
    violated: pl.Expr
    message: pl.Expr


def _text(column: str) -> pl.Expr:
    return pl.col(column).str.strip_chars()


def _present(column: str) -> pl.Expr:
    return _text(column).is_not_null() & (_text(column) != "")


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
CURRENCY_PATTERN = r"^[A-Z]{3}$"
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%#z"


def parse_timestamp(column: str) -> pl.Expr:
    return _text(column).str.to_datetime(
        format=TIMESTAMP_FORMAT, strict=False, time_zone="UTC", time_unit="us"
    )


def _money_rule(column: str) -> Rule:
    # Absence is the business of a `required:` rule; this one judges values that are there.
    return Rule(
        name=f"decimal_12_2:{column}",
        violated=_present(column) & ~_text(column).str.contains(MONEY_PATTERN),
        message=pl.format(
            f"{column} must be a decimal(12,2) (at most 10 integer and 2 fraction digits), "
            "got '{}'",
            pl.col(column),
        ),
    )


#: Conformance of a decoded record to the BillingEvent contract. Business rules (issue #3:
#: sign by type, supported currencies, refunds needing a payment) are a separate set.
CONTRACT_RULES: tuple[Rule, ...] = (
    _missing("event_id"),
    _missing("customer_id"),
    Rule(
        name="integer:customer_id",
        violated=_present("customer_id") & ~_text("customer_id").str.contains(CUSTOMER_ID_PATTERN),
        message=pl.format(
            "customer_id must be a positive integer, got '{}'", pl.col("customer_id")
        ),
    ),
    _missing("transaction_type"),
    Rule(
        name="enum:transaction_type",
        violated=_present("transaction_type")
        & ~_text("transaction_type").str.to_uppercase().is_in(TRANSACTION_TYPES),
        message=pl.format(
            f"transaction_type must be one of {', '.join(TRANSACTION_TYPES)}, got '{{}}'",
            pl.col("transaction_type"),
        ),
    ),
    _missing("amount"),
    _money_rule("amount"),
    _money_rule("tax_amount"),
    Rule(
        name="format:currency",
        violated=_present("currency") & ~_text("currency").str.contains(CURRENCY_PATTERN),
        message=pl.format(
            "currency must be a three-letter upper-case ISO 4217 code, got '{}'", pl.col("currency")
        ),
    ),
    Rule(
        name="timestamp:created_at",
        violated=_present("created_at") & parse_timestamp("created_at").is_null(),
        message=pl.format(
            "created_at must be an ISO-8601 timestamp with a zone (2026-11-24T13:05:00.123Z), "
            "got '{}'",
            pl.col("created_at"),
        ),
    ),
)


def apply_rules(frame: pl.DataFrame, rules: Sequence[Rule]) -> pl.DataFrame:
    """Add `rules` (names broken, as a list) and `reason` (their messages joined) columns.

    Rows breaking no rule get an empty list and a null reason.
    """
    if not rules:
        return frame.with_columns(
            rules=pl.lit([], dtype=pl.List(pl.String)), reason=pl.lit(None, dtype=pl.String)
        )
    names = pl.concat_list(
        [pl.when(r.violated.fill_null(True)).then(pl.lit(r.name)) for r in rules]
    ).list.drop_nulls()
    messages = pl.concat_list(
        [pl.when(r.violated.fill_null(True)).then(r.message.fill_null(r.name)) for r in rules]
    ).list.drop_nulls()
    return frame.with_columns(rules=names, reason=messages.list.join("; ")).with_columns(
        reason=pl.when(pl.col("rules").list.len() > 0).then(pl.col("reason"))
    )
