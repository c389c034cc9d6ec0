"""Screens over the raw text of JSON record values, all vectorised over a whole batch.

Polars' `json_decode` is fast but forgiving in ways money cannot afford, and strict in
ways that fail a whole batch (verified with Polars 2.1):
- a JSON number becomes a float before it becomes text: `10.0000000000000001` decodes
  as "10", `1e3` as "1000", a customer_id `12.0` as "12";
- a lone UTF-16 surrogate escape (`"\\ud800"`) decodes to NUL, which Postgres refuses
  (a lone low surrogate fails the call instead);
- of a key given twice, the first value silently wins; an escaped key (`"\\u0061mount"`)
  is the same key;
- very deep nesting fails the call (and exhausts Python's recursion in the per-record
  screen that runs after such a failure).

So before the decode, records nested deeper than MAX_NESTING_DEPTH and records with a
lone surrogate are set aside with a reason (their text goes on as null); after it, the
money fields and customer_id take the number's literal text from the record, so the
contract rules judge what the producer wrote, never a float. Rows whose keys cannot be
located by a regex alone (a contract key twice anywhere in the record, or an escaped key)
are parsed exactly by Python's json module: only those rows, so a clean batch stays
vectorised end to end.

`screen_json` is the per-record screen that names why one value cannot decode at all;
decoding.py runs it only in segments the vectorised decode failed on, and there only on
the rows `json_suspects` names, unless the others fail to decode too.
"""

from __future__ import annotations

import json
import math

import polars as pl

from billing_dagster.contract import WIRE_FIELDS, WIRE_STRUCT
from billing_dagster.rules import MAX_NESTING_DEPTH, QUOTE_CHARS

#: Why a record failed before the contract rules could look at it: stage, rule, reason.
Failure = tuple[str, str, str]

#: Contract fields that may arrive as JSON numbers and must keep their exact text.
NUMBER_FIELDS: tuple[str, ...] = ("amount", "tax_amount", "customer_id")

_STRING = r'"(?:[^"\\]|\\.)*"'
_OPENERS = r"[\[{]"
_INNERMOST_PAIR = r"\[\]|\{\}"
# A \u escape inside a key: the key may spell a contract field ("\u0061mount").
_ESCAPED_KEY = r'\\u[0-9a-fA-F]{4}[^"]*"\s*:'
# The value of a key when it is a JSON number with a fraction or an exponent.
_NON_INTEGER = r"\s*(-?\d+[.eE][\d.eE+\-]*)"
# Some key's value is such a number (a cheap first look: most events have none).
_ANY_NON_INTEGER = r'"\s*:\s*-?\d+[.eE]'
_SURROGATE = r"(?i)\\ud[89a-f][0-9a-f]{2}"
_SURROGATE_PAIR = r"(?i)\\ud[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}"


def _key(name: str) -> str:
    return rf'"{name}"\s*:'


#: A contract field whose value is an object or an array: the vectorised decode fails on it.
_STRUCTURED_FIELD = rf'"(?:{"|".join(WIRE_FIELDS)})"\s*:\s*{_OPENERS}'


def json_suspects(text: pl.Series) -> pl.Series:
    """Row numbers (UInt32) of the records that likely fail the vectorised decode: text a
    JSON parser refuses, a value that is not an object, a contract field holding a
    structure, or an escaped key. decoding.py screens them one by one and decodes the
    others in one call; a cause this misses makes that call fail, and every row is then
    screened."""
    t = pl.col("_t")
    suspect = (
        t.str.json_path_match("$").is_null()  # not JSON (serde_json, in Rust, row by row)
        | ~t.str.strip_chars_start(" \t\n\r").str.starts_with("{")
        | t.str.contains(_STRUCTURED_FIELD)
        | t.str.contains(_ESCAPED_KEY)
    )
    return (
        pl.DataFrame({"_t": text})
        .with_columns(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), suspect.alias("_s"))
        .filter(pl.col("_s") & pl.col("_t").is_not_null())["_row"]
    )


def as_text(values: pl.Series) -> pl.Series:
    """Record values as String; values that are not UTF-8 become null (the per-record
    screen names them `utf8` later)."""
    try:
        return values.cast(pl.String)
    except pl.exceptions.PolarsError:
        pass
    # Some value is not UTF-8: cast ever smaller segments, checking rows one by one in
    # Python only in the segments of 64 that still fail.
    if values.len() <= 64:
        return pl.Series(values.name, [_utf8(v) for v in values], dtype=pl.String)
    step = max(64, values.len() // 16)
    parts = [as_text(values.slice(start, step)) for start in range(0, values.len(), step)]
    return pl.concat(parts, rechunk=True)


def _utf8(value: bytes | None) -> str | None:
    try:
        return None if value is None else value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def screen_json(
    value: bytes | str | None, scalar_fields: tuple[str, ...] = WIRE_FIELDS
) -> Failure | None:
    """Why one record cannot decode, in words an operator can act on; None if it can."""
    if not value:
        return "decode", "empty_value", "record has no value (tombstone or empty message)"
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else value
    except UnicodeDecodeError as exc:
        return "decode", "utf8", f"value is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    if not text.strip():
        return "decode", "empty_value", "record value is blank"
    try:
        document = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except _OutOfRange as exc:
        return "decode", "number:range", str(exc)
    except RecursionError:
        # json_text.screen_structure sets deep records aside first; this is the backstop.
        return "decode", "limit:nesting", "value nests arrays/objects too deep to parse"
    except ValueError as exc:
        if not isinstance(exc, json.JSONDecodeError):
            return "decode", "json", f"value is not valid JSON ({exc})"
        where = f"line {exc.lineno} column {exc.colno}"
        return "decode", "json", f"value is not valid JSON ({exc.msg} at {where})"
    if not isinstance(document, dict):
        kind = "null" if document is None else type(document).__name__
        return "decode", "json_object", f"value is a JSON {kind}, expected an object"
    for name in scalar_fields:
        if isinstance(document.get(name), dict | list):
            return (
                "decode",
                "field_type",
                f"field {name} must be a scalar value, got a JSON structure",
            )
    return None


def _refuse_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON (and Polars) do not.
    raise ValueError(f"{name} is not a JSON value")


class _OutOfRange(ValueError):
    pass


def _finite(text: str) -> float:
    # Python reads 1e400 as inf; Polars refuses it, and no contract value is that large.
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}…"
        raise _OutOfRange(f"number {shown} is beyond the range of any contract value")
    return value


def screen_structure(text: pl.Series, failures: dict[int, Failure]) -> pl.Series:
    """Set aside records nested too deep or holding a lone surrogate escape: each gets
    its failure in `failures` (by row) and comes back as null text."""
    rows = pl.DataFrame({"_t": text}).with_row_index("_row")
    # Depth never exceeds the number of openers, so only rows with more than the limit
    # (rare: a billing event has one) are measured.
    deep = rows.filter(pl.col("_t").str.count_matches(_OPENERS) > MAX_NESTING_DEPTH)
    if deep.height:
        brackets = pl.col("_t").str.replace_all(_STRING, "").str.replace_all(r"[^\[\]{}]", "")
        # Each pass removes the innermost pairs, so it lowers the depth by exactly one;
        # whatever is left after MAX_NESTING_DEPTH passes is nested deeper (or unbalanced).
        for _ in range(MAX_NESTING_DEPTH):
            brackets = brackets.str.replace_all(_INNERMOST_PAIR, "")
        too_deep = deep.filter(brackets != "")
        for row, size in too_deep.select("_row", pl.col("_t").str.len_bytes()).iter_rows():
            failures[row] = (
                "decode",
                "limit:nesting",
                f"value nests arrays/objects more than {MAX_NESTING_DEPTH} levels deep "
                f"(or its brackets do not balance) in {size} bytes; a billing event needs 1",
            )
    lone = (
        rows.filter(pl.col("_t").str.contains(_SURROGATE))
        # Escaped backslashes first (left to right, as a JSON parser pairs them), then
        # well-formed pairs: any surrogate escape left is a lone one.
        .with_columns(
            _t=pl.col("_t")
            .str.replace_all(r"\\", "", literal=True)
            .str.replace_all(_SURROGATE_PAIR, "")
        )
        .filter(pl.col("_t").str.contains(_SURROGATE))
        .select("_row", pl.col("_t").str.extract(f"({_SURROGATE})"))
    )
    for row, escape in lone.iter_rows():
        failures.setdefault(
            row,
            (
                "decode",
                "text:lone_surrogate",
                f"value has the escape {escape}, half of a UTF-16 surrogate pair without its "
                "other half: not a character (Polars would make it NUL, which Postgres "
                "cannot store)",
            ),
        )
    if not failures:
        return text
    failed = pl.Series(list(failures), dtype=pl.UInt32)
    return (
        rows.select(pl.when(~pl.col("_row").is_in(failed.implode())).then(pl.col("_t")))
        .to_series()
        .alias(text.name)
    )


def exact_numbers(text: pl.Series, wire: pl.Series, failures: dict[int, Failure]) -> pl.Series:
    """`wire` with amount, tax_amount and customer_id as written in the record when they
    are JSON numbers with a fraction or an exponent (an integer's text is already exact);
    records with a contract key given twice go to `failures`."""
    t = pl.col("_t")
    flags = pl.DataFrame({"_t": text, "_w": wire}).select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"),
        pl.col("_w").is_not_null().alias("_decoded"),
        # A key's name twice anywhere (nested, or as a value) sends the record to the
        # exact parse; so does a key with an escape. Both are rare in billing events.
        (
            pl.any_horizontal([t.str.count_matches(f'"{k}"') > 1 for k in WIRE_FIELDS])
            | t.str.contains(_ESCAPED_KEY)
        ).alias("_ambiguous"),
        t.str.contains(_ANY_NON_INTEGER).alias("_numeric"),
    )
    flags = flags.filter(pl.col("_decoded") & (pl.col("_ambiguous") | pl.col("_numeric")))
    if flags.is_empty():
        return wire
    # One occurrence of the key and a decoded value: the regex found the top-level key.
    plain = flags.filter(~pl.col("_ambiguous"))["_row"]
    literals = pl.DataFrame({"_row": plain, "_t": text.gather(plain)}).select(
        "_row", *[t.str.extract(_key(k) + _NON_INTEGER).alias(k) for k in NUMBER_FIELDS]
    )
    exact: list[dict[str, object]] = []
    ambiguous = flags.filter(pl.col("_ambiguous"))["_row"]
    for row, value in zip(ambiguous, text.gather(ambiguous), strict=True):
        found = exact_fields(value)
        if isinstance(found, tuple):
            failures[row] = found
        elif found:
            exact.append({"_row": row, **found})
    if exact:
        literals = pl.concat([literals, pl.DataFrame(exact, schema=literals.schema)])
    if literals.is_empty():
        return wire
    fields = (
        wire.struct.unnest()
        .with_row_index("_row")
        .join(literals, on="_row", how="left", suffix="_literal")
        .sort("_row")
    )
    # A literal only replaces a decoded value: absent fields stay absent.
    replaced = [
        pl.when(pl.col(k).is_not_null()).then(pl.coalesce(f"{k}_literal", k)).alias(k)
        if k in NUMBER_FIELDS
        else pl.col(k)
        for k in WIRE_FIELDS
    ]
    return (
        pl.DataFrame({"_w": wire})
        .with_columns(fields.select(replaced).to_struct("_s"))
        .select(pl.when(pl.col("_w").is_not_null()).then(pl.col("_s")))
        .to_series()
        .cast(WIRE_STRUCT)
        .alias(wire.name)
    )


class _Number(str):
    """A JSON number's literal text, as written."""


class _Object(dict):
    """A JSON object that remembers which keys it was given more than once."""

    duplicates: frozenset[str] = frozenset()


def _object(pairs: list[tuple[str, object]]) -> _Object:
    result = _Object()
    repeated = set()
    for key, value in pairs:
        if key in result:
            repeated.add(key)
        else:  # the first value, as Polars keeps it
            result[key] = value
    result.duplicates = frozenset(repeated)
    return result


def exact_fields(text: str) -> Failure | dict[str, str] | None:
    """The literals of the top-level number fields of one record, parsed exactly; a
    Failure if a contract key is given twice; None if Python cannot parse it."""
    try:
        document = json.loads(
            text, object_pairs_hook=_object, parse_float=_Number, parse_int=_Number
        )
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, _Object):
        return None
    repeated = sorted(document.duplicates & set(WIRE_FIELDS))
    if repeated:
        return (
            "decode",
            "json:duplicate_key",
            f"key {', '.join(repeated)} appears more than once in the record: which value "
            "counts is ambiguous",
        )
    return {k: str(v) for k in NUMBER_FIELDS if isinstance(v := document.get(k), _Number)}
