"""Great Expectations 1.x suites (expectations/*.json) run over Polars frames.

Money columns go to GE as exact Python Decimals (pandas object columns), never floats;
money bounds in the JSON are decimal strings for the same reason. Suite parameters
(`{"$PARAMETER": name}`) are given at validation; an expectation whose parameter is not
given is skipped and listed as such (freshness is only judged when a run wrote rows).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

import polars as pl

from expectations import SUITES_DIR

_BOUNDS = ("min_value", "max_value")


class QualitySuiteError(RuntimeError):
    """A suite file is missing or invalid; the message names the file."""


@dataclass(frozen=True)
class SuiteFile:
    name: str
    version: int
    expectations: tuple[dict[str, Any], ...]


def _decimal_bounds(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key in _BOUNDS:
        if isinstance(out.get(key), str):
            try:
                out[key] = Decimal(out[key])
            except InvalidOperation:
                raise ValueError(f"{key} '{out[key]}' is not a decimal") from None
    return out


def load_suite_file(name: str, folder: Path = SUITES_DIR) -> SuiteFile:
    path = folder / f"{name}.json"
    try:
        raw = json.loads(path.read_text())
        expectations = tuple(
            {
                "type": e["type"],
                "kwargs": _decimal_bounds(e.get("kwargs", {})),
                "meta": e.get("meta", {}),
            }
            for e in raw["expectations"]
        )
        return SuiteFile(raw["name"], int(raw.get("version", 1)), expectations)
    except FileNotFoundError:
        raise QualitySuiteError(f"no expectation suite {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise QualitySuiteError(f"invalid expectation suite {path}: {exc}") from None


def _parameter_names(kwargs: Mapping[str, Any]) -> set[str]:
    return {v["$PARAMETER"] for v in kwargs.values() if isinstance(v, dict) and "$PARAMETER" in v}


@cache
def _context() -> Any:
    """One ephemeral context per process: no files, no analytics, no progress bars."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral", project_config=None)
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _batch_definition() -> Any:
    context = _context()
    try:
        source = context.data_sources.get("frames")
    except (KeyError, ValueError, LookupError):
        source = None
    if source is None:
        source = context.data_sources.add_pandas("frames")
        return source.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("whole")
    return source.get_asset("frame").get_batch_definition("whole")


def to_pandas_exact(frame: pl.DataFrame) -> Any:
    """Decimals as Python Decimal objects; timestamps stay tz-aware."""
    decimals = [c for c, t in frame.schema.items() if isinstance(t, pl.Decimal)]
    pandas = frame.drop(decimals).to_pandas()
    for column in decimals:
        pandas[column] = frame[column].to_list()
    return pandas[frame.columns] if frame.width else pandas


def money_as_units(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Decimal columns as exact whole numbers of their smallest unit (cents for
    decimal(12,2)), with each converted column's scale. GE compares Python Decimals one by
    one; integers it compares vectorised, and just as exactly. A column too wide for 64
    bits stays Decimal."""
    scales: dict[str, int] = {}
    columns = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.Decimal) and dtype.scale is not None:
            try:
                units = (frame[name] * 10**dtype.scale).cast(pl.Int64, strict=True)
            except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError):
                columns.append(frame[name])
                continue
            columns.append(units.alias(name))
            scales[name] = dtype.scale
        else:
            columns.append(frame[name])
    return pl.DataFrame(columns), scales


def bounds_in_units(kwargs: Mapping[str, Any], scale: int) -> dict[str, Any]:
    """A between-expectation's Decimal bounds in units of 10**-scale, exactly: the least
    whole unit at or above the minimum, the greatest at or below the maximum."""
    out = dict(kwargs)
    for key, rounding in (("min_value", ROUND_CEILING), ("max_value", ROUND_FLOOR)):
        if isinstance(out.get(key), Decimal):
            out[key] = int(out[key].scaleb(scale).to_integral_value(rounding=rounding))
    return out


def _plain(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value != value:  # NaN stands for a missing value
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()  # type: ignore[union-attr]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class FailedExpectation:
    type: str
    column: str
    kwargs: dict[str, object]
    unexpected_count: int | None
    unexpected_percent: float | None
    observed_value: object
    sample_rows: list[dict[str, object]]
    why: str = ""

    def line(self) -> str:
        what = f"{self.type} on {self.column}"
        if self.unexpected_count is not None:
            return f"{what}: {self.unexpected_count} rows ({self.unexpected_percent:.2f}%) break it"
        return f"{what}: observed {self.observed_value}"


@dataclass(frozen=True)
class QualityReport:
    suite: str
    suite_version: int
    success: bool
    rows: int
    evaluated: int
    failed: list[FailedExpectation] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.success:
            return (
                f"{self.suite} v{self.suite_version}: all {self.evaluated} expectations met "
                f"on {self.rows} rows"
            )
        return "\n".join(f.line() for f in self.failed)

    def to_metadata(self) -> dict[str, object]:
        return {
            "suite": f"expectations/{self.suite}.json v{self.suite_version}",
            "rows_validated": self.rows,
            "expectations_evaluated": self.evaluated,
            "expectations_failed": len(self.failed),
            "failed": [
                {
                    "expectation": f.type,
                    "column": f.column,
                    "kwargs": f.kwargs,
                    "unexpected_count": f.unexpected_count,
                    "unexpected_percent": f.unexpected_percent,
                    "observed_value": f.observed_value,
                    "sample_rows": f.sample_rows,
                    "why": f.why,
                }
                for f in self.failed
            ],
            "skipped": self.skipped,
            "summary": self.summary(),
        }


def validate_frame(
    frame: pl.DataFrame,
    suite_name: str,
    *,
    parameters: Mapping[str, object] | None = None,
    sample_size: int = 5,
) -> QualityReport:
    """Run expectations/<suite_name>.json over `frame`."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    spec = load_suite_file(suite_name)
    parameters = dict(parameters or {})
    if frame.is_empty():
        return QualityReport(spec.name, spec.version, True, 0, 0)
    # Only the columns the suite names go to pandas: GE hashes the whole frame to identify
    # the batch. Rows keep their order, so sample rows are read from the full frame.
    named = {
        column
        for e in spec.expectations
        for column in [e["kwargs"].get("column"), *(e["kwargs"].get("column_list") or [])]
        if column
    }
    judged, scales = money_as_units(
        frame.select([c for c in frame.columns if c in named]) if named else frame
    )
    suite = gx.ExpectationSuite(name=f"{spec.name}-v{spec.version}")
    skipped, entries = [], {}
    for expectation in spec.expectations:
        missing = _parameter_names(expectation["kwargs"]) - set(parameters)
        if missing:
            skipped.append(f"{expectation['type']} (no {', '.join(sorted(missing))} given)")
            continue
        kwargs = expectation["kwargs"]
        if kwargs.get("column") in scales:
            kwargs = bounds_in_units(kwargs, scales[kwargs["column"]])
        configuration = ExpectationConfiguration(
            type=expectation["type"], kwargs=kwargs, meta=expectation["meta"]
        )
        suite.add_expectation_configuration(configuration)
        entries[_identity(expectation["type"], expectation["kwargs"])] = expectation
    batch = _batch_definition().get_batch(batch_parameters={"dataframe": to_pandas_exact(judged)})
    result = batch.validate(
        suite,
        expectation_parameters={k: _ge_value(v) for k, v in parameters.items()},
        result_format={"result_format": "COMPLETE"},
    )
    failed = []
    for outcome in result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        entry = entries.get(_identity(config.type, config.kwargs), {})
        # Reports show the suite's own bounds (decimal strings), not the unit integers.
        original = entry.get("kwargs", config.kwargs)
        kwargs = {k: _plain(v) for k, v in original.items() if k != "batch_id"}
        column = str(kwargs.get("column") or ", ".join(kwargs.get("column_list") or []))  # type: ignore[arg-type]
        details = outcome.result or {}
        rows = list(details.get("unexpected_index_list") or [])[:sample_size]
        samples = [
            {k: _plain(v) for k, v in frame.row(int(i), named=True).items()}
            for i in rows
            if isinstance(i, int)
        ]
        error = (outcome.exception_info or {}).get("exception_message")
        failed.append(
            FailedExpectation(
                type=config.type,
                column=column,
                kwargs=kwargs,
                unexpected_count=details.get("unexpected_count"),
                unexpected_percent=details.get("unexpected_percent"),
                observed_value=_plain(details.get("observed_value") or error),
                sample_rows=samples,
                why=entry.get("meta", {}).get("why", ""),
            )
        )
    return QualityReport(
        spec.name,
        spec.version,
        not failed,
        frame.height,
        len(result.results),
        failed,
        skipped,
    )


def _identity(kind: str, kwargs: Mapping[str, Any]) -> tuple[str, str]:
    """Which suite entry a result belongs to (GE does not keep the suite's order)."""
    return kind, str(kwargs.get("column") or kwargs.get("column_list"))


def _ge_value(value: object) -> object:
    if isinstance(value, tuple | set):
        return list(value)
    return value
