"""Hostile records go to quarantine with their rule and a reason; their neighbours go on.

Pure Polars, no servers: each kind of tests/hostile_corpus.py is decoded by
`decode_records` and judged by `clean_events` beside good events, the way a batch is.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import polars as pl
import pytest

from billing_dagster.avro_format import AvroEventEncoder, SchemaRegistrySource
from billing_dagster.cleaning import clean_events
from billing_dagster.contract import BillingEvent, TransactionType
from billing_dagster.decoding import ValueFormat, decode_records
from billing_dagster.dedupe import PRIOR_SCHEMA
from billing_dagster.definitions import build_resources
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.enrichment import write_reference_data
from billing_dagster.rules import QUOTE_CHARS, ContractLimits, ValidationPolicy
from billing_dagster.settings import ConfigError, load_settings
from billing_dagster.synthetic import SyntheticBillingStream

from .hostile_corpus import Hostile, good_event, hostile_corpus
from .test_encodings import debezium

NOW = datetime.now(UTC).replace(microsecond=0)
CORPUS = hostile_corpus(NOW)
REFERENCE = SyntheticBillingStream().reference_data(around=NOW)


def records(values: list[bytes | None], keys: list[bytes] | None = None) -> pl.DataFrame:
    n = len(values)
    return pl.DataFrame(
        {
            "kafka_topic": ["t"] * n,
            "kafka_partition": [0] * n,
            "kafka_offset": list(range(n)),
            "kafka_timestamp": [NOW] * n,
            "kafka_key": keys or [b"k"] * n,
            "value": values,
        },
        schema_overrides={"value": pl.Binary, "kafka_key": pl.Binary},
    )


def judge(
    frame: pl.DataFrame,
    *,
    limits: ContractLimits | None = None,
    value_format: ValueFormat = ValueFormat.JSON,
    registry: SchemaRegistrySource | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(accepted, quarantine) of one batch, as ingest decides them with no history."""
    decoded = decode_records(
        frame,
        value_format=value_format,
        registry=registry,
        run_id="hostile",
        now=NOW,
        limits=limits or ContractLimits(),
    )
    cleaned = clean_events(
        decoded.events,
        accepted_before=pl.DataFrame(schema=PRIOR_SCHEMA),
        first_payments=pl.DataFrame(
            schema={"customer_id": pl.Int64, "first_payment_at": pl.Datetime("us", "UTC")}
        ),
        reference=REFERENCE,
        policy=ValidationPolicy(),
        run_id="hostile",
        now=NOW,
    )
    assert cleaned.duplicates.is_empty()
    return cleaned.accepted, pl.concat([decoded.quarantine, cleaned.quarantine])


def test_the_corpus_has_at_least_fifty_distinct_kinds_and_values():
    assert len(CORPUS) >= 50
    assert len({h.kind for h in CORPUS}) == len(CORPUS)
    assert len({h.value for h in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("hostile", CORPUS, ids=lambda h: h.kind)
def test_each_hostile_record_is_quarantined_and_its_neighbours_accepted(hostile: Hostile):
    accepted, quarantine = judge(records([good_event(1, NOW), hostile.value, good_event(2, NOW)]))
    assert sorted(accepted["event_id"]) == ["good-1", "good-2"]
    assert accepted["amount"].to_list() == [Decimal("10.00")] * 2
    assert quarantine.height == 1, quarantine
    row = quarantine.row(0, named=True)
    assert row["kafka_offset"] == 1
    assert hostile.rule in row["rules"], (row["rules"], row["reason"])
    assert row["reason"]
    # A reason quotes values, it does not carry them (a megabyte into alerts and logs).
    assert len(row["reason"]) < 1000
    assert "\x00" not in row["reason"]
    assert row["raw_value"] == hostile.value


def test_the_whole_corpus_among_synthetic_events_in_one_batch():
    stream = SyntheticBillingStream(seed=17, invalid_rate=0, duplicate_rate=0)
    good = list(stream.records(3 * len(CORPUS), now=NOW))
    values: list[bytes | None] = []
    expected: dict[int, str] = {}
    for index, record in enumerate(good):
        values.append(record.value)
        if index % 3 == 1:
            hostile = CORPUS[index // 3]
            expected[len(values)] = hostile.rule
            values.append(hostile.value)
    accepted, quarantine = judge(records(values))
    assert accepted.height == len(good)
    assert set(accepted["event_id"]) == {r.event.event_id for r in good}
    assert sorted(accepted["amount"]) == sorted(r.event.amount for r in good)
    found = {row["kafka_offset"]: row for row in quarantine.iter_rows(named=True)}
    assert set(found) == set(expected)
    for offset, rule in expected.items():
        assert rule in found[offset]["rules"], (offset, found[offset])
    # Every rule of the corpus was met, and reasons stay short whatever the record's size.
    assert Counter(r for rules in quarantine["rules"] for r in rules).keys() >= {
        h.rule for h in CORPUS
    }
    assert quarantine["reason"].str.len_chars().max() < 1000


# ---- numbers are judged as written ------------------------------------------------------

_HEAD = '"event_id":"n-{}","customer_id":1001,"transaction_type":"PAYMENT"'


def _number_event(index: int, members: str, *, before: str = "") -> bytes:
    return ("{" + before + _HEAD.format(index) + "," + members + "}").encode()


def test_json_numbers_keep_their_literal_and_plain_values_still_pass():
    values = [
        _number_event(0, '"amount":12.300'),  # trailing zeros: 12.30, as a string would be
        _number_event(1, '"amount":0.10,"tax_amount":0.01'),
        _number_event(2, '"amount":100'),
        # A nested "amount" first: the top-level literal is the one judged.
        _number_event(3, '"amount":12.34', before='"items":[{"amount":5.5}],'),
        _number_event(4, '"amount":10.0000000000000001', before='"items":[{"amount":5}],'),
        # A key spelt with an escape is the same key, and its literal is judged too.
        _number_event(5, '"\\u0061mount":10.0000000000000001'),
        _number_event(6, '"\\u0061mount":"7.00"'),
    ]
    accepted, quarantine = judge(records(values))
    amounts = dict(accepted.select("event_id", "amount").iter_rows())
    assert amounts == {
        "n-0": Decimal("12.30"),
        "n-1": Decimal("0.10"),
        "n-2": Decimal("100.00"),
        "n-3": Decimal("12.34"),
        "n-6": Decimal("7.00"),
    }
    assert accepted.filter(pl.col("event_id") == "n-1")["tax_amount"].item() == Decimal("0.01")
    assert quarantine.sort("kafka_offset")["kafka_offset"].to_list() == [4, 5]
    assert quarantine["rules"].to_list() == [["decimal_12_2:amount"]] * 2
    assert "got '10.0000000000000001'" in quarantine["reason"][0]


def test_text_that_only_looks_hostile_is_accepted():
    deep_enough = "[" * 63 + "]" * 63  # with the event's own object: 64 levels, the limit
    values = [
        # An escaped backslash before "ud800" is text, not a surrogate escape.
        _number_event(0, '"amount":"1.00","metadata":"C:\\\\ud800"'),
        _number_event(1, '"amount":"1.00","metadata":"\\ud83d\\ude00 paid"'),  # a pair
        _number_event(2, '"amount":"1.00","metadata":"line 1\\n\\tline 2\\r\\n"'),
        _number_event(3, f'"amount":"1.00","x":{deep_enough}'),
        _number_event(4, '"amount":"1.00","items":[' + ",".join(['{"a":[1]}'] * 200) + "]"),
        _number_event(5, '"amount":"1.00","metadata":"{\\"amount\\": 99, \\"amount\\": 1}"'),
    ]
    accepted, quarantine = judge(records(values))
    assert quarantine.is_empty(), quarantine
    assert accepted.sort("event_id")["metadata"].to_list()[:3] == [
        "C:\\ud800",
        "\U0001f600 paid",
        "line 1\n\tline 2\r\n",
    ]


# ---- limits are settings ----------------------------------------------------------------


def test_limits_come_from_the_settings_into_the_cleaning_context(tmp_path):
    env = {
        "BILLING_MAX_EVENT_ID_LENGTH": "40",
        "BILLING_MAX_METADATA_BYTES": "16",
        "BILLING_MAX_RECORD_BYTES": "2048",
        "BILLING_LAKE_ROOT": str(tmp_path / "lake"),
    }
    lake = LakeLocation(env["BILLING_LAKE_ROOT"])
    write_reference_data(lake, REFERENCE)
    resource = build_resources(load_settings(env))["billing_rules"]
    limits = resource.cleaning_context(lake, ValueFormat.JSON).limits
    assert limits == ContractLimits(40, 16, 2048)

    values = [
        _number_event(0, '"amount":"1.00","event_id":"' + "e" * 41 + '"'),
        _number_event(1, '"amount":"1.00","metadata":"' + "m" * 17 + '"'),
        _number_event(2, '"amount":"1.00","pad":"' + "p" * 2048 + '"'),
        _number_event(3, '"amount":"1.00","metadata":"' + "m" * 16 + '"'),
    ]
    # (the first two carry event_id twice: the duplicate is the first rule they meet)
    values[0] = values[0].replace(b'"event_id":"n-0",', b"")
    _, quarantine = judge(records(values), limits=limits)
    assert quarantine.sort("kafka_offset")["rules"].to_list() == [
        ["limit:event_id_length"],
        ["limit:metadata_bytes"],
        ["limit:record_bytes"],
    ]
    assert "2048 allowed (BILLING_MAX_RECORD_BYTES)" in quarantine["reason"][2]
    accepted, quarantine = judge(records(values))  # the defaults take all four
    assert accepted.height == 4 and quarantine.is_empty()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BILLING_MAX_EVENT_ID_LENGTH", "ten", "must be a whole number"),
        ("BILLING_MAX_EVENT_ID_LENGTH", "20", "must be at least 36"),
        ("BILLING_MAX_METADATA_BYTES", "0", "must be at least 1"),
        ("BILLING_MAX_RECORD_BYTES", "1MB", "must be a whole number"),
        ("BILLING_MAX_RECORD_BYTES", "100", "must be at least 1024"),
    ],
)
def test_a_wrong_limit_setting_names_the_variable(name, value, message):
    with pytest.raises(ConfigError) as error:
        load_settings({name: value})
    assert str(error.value).startswith(name) and message in str(error.value)


# ---- the other encodings get the same screening ----------------------------------------


def test_debezium_records_are_screened_like_json():
    row = {
        "transaction_id": "t-ok",
        "customer_id": 1001,
        "transaction_type": "PAYMENT",
        "amount": "5.00",
        "currency": "USD",
        "created_at": NOW.isoformat().replace("+00:00", "Z"),
    }
    deep = json.dumps({**row, "transaction_id": "t-deep"})[:-1] + ',"x":' + "[" * 1000 + "]" * 1000
    values = [
        debezium("transactions", "c", row),
        debezium("transactions", "c", {**row, "transaction_id": "t-\u0000"}),
        debezium("transactions", "c", {**row, "transaction_id": "t-s"}).replace(
            b"t-s", b"t-\\udc00"
        ),
        debezium("transactions", "c", None).replace(
            b'"after": null', b'"after": ' + deep.encode() + b"}"
        ),
        debezium("transactions", "c", {**row, "transaction_id": "t-big", "metadata": "m" * 3000}),
    ]
    accepted, quarantine = judge(
        records(values),
        value_format=ValueFormat.DEBEZIUM_JSON,
        limits=ContractLimits(128, 2048, 8192),
    )
    assert accepted["event_id"].to_list() == ["t-ok"]
    assert quarantine.sort("kafka_offset")["rules"].to_list() == [
        ["text:control_character"],
        ["text:lone_surrogate"],
        ["limit:nesting"],
        ["limit:metadata_bytes"],
    ]


def test_avro_strings_with_control_characters_are_quarantined():
    encoder = AvroEventEncoder("mock://hostile-records", "hostile-value")
    event = BillingEvent(
        event_id="a-ok",
        customer_id=1001,
        transaction_type=TransactionType.PAYMENT,
        amount=Decimal("5.00"),
        created_at=NOW,
    )
    values = [
        encoder.encode(event),
        encoder.encode(BillingEvent(**{**event.__dict__, "event_id": "a-\u0000"})),
        encoder.encode(BillingEvent(**{**event.__dict__, "event_id": "a-" + "e" * 200})),
        encoder.encode(BillingEvent(**{**event.__dict__, "metadata": "bell\a"})),
    ]
    accepted, quarantine = judge(
        records(values),
        value_format=ValueFormat.AVRO,
        registry=SchemaRegistrySource("mock://hostile-records"),
    )
    assert accepted["event_id"].to_list() == ["a-ok"]
    q = quarantine.sort("kafka_offset")
    assert q["rules"].to_list() == [
        ["text:control_character"],
        ["limit:event_id_length"],
        ["text:control_character"],
    ]
    assert "event_id contains control character U+0000 at byte 2" in q["reason"][0]
    assert "metadata contains control character U+0007" in q["reason"][2]
    assert q["reason"][1].endswith("'a-" + "e" * (QUOTE_CHARS - 2) + "…'")
