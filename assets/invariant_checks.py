"""The serving invariants (billing_dagster/invariants.py) as Dagster asset checks.

They run in their own job, `check_serving_invariants`, every 15 minutes and in the daily
reconciliation. Ingest lanes commit in parallel, so they compare Postgres with the lake
while holding the lake barrier (billing_dagster/lake_barrier.py): no batch is between its
first and last commit then. A failure raises the "Serving Invariant Broken" alert
(docs/runbooks/serving-invariant-broken.md).
"""

import dagster as dg

from assets.ingest import CUSTOMER_BALANCES, TRANSACTION_HISTORY
from assets.pools import LAKE_POOL
from billing_dagster.invariants import (
    BALANCES_EQUAL_HISTORY,
    HISTORY_MATCHES_BILLING_EVENTS,
    MARKS_MATCH_LAKE,
    InvariantResult,
    balances_equal_history,
    history_matches_billing_events,
    marks_match_lake,
)
from billing_dagster.lake_barrier import LakeBusyError, lake_at_rest
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.topic_identity import current_generation
from resources import DeltaLakeResource, KafkaResource, PostgresServingResource


def _unavailable(check: dg.AssetCheckKey, exc: ServingUnavailableError) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=check.name,
        asset_key=check.asset_key,
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=str(exc),
    )


def _result(check: dg.AssetCheckKey, evaluate) -> dg.AssetCheckResult:
    try:
        result: InvariantResult = evaluate()
    except ServingUnavailableError as exc:
        return _unavailable(check, exc)
    return dg.AssetCheckResult(
        check_name=check.name,
        asset_key=check.asset_key,
        passed=result.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        description=result.summary,
        metadata={"offending": dg.MetadataValue.json(result.details)},
    )


INVARIANT_CHECKS = (
    dg.AssetCheckKey(CUSTOMER_BALANCES, BALANCES_EQUAL_HISTORY),
    dg.AssetCheckKey(TRANSACTION_HISTORY, HISTORY_MATCHES_BILLING_EVENTS),
    dg.AssetCheckKey(CUSTOMER_BALANCES, MARKS_MATCH_LAKE),
)


def build_invariant_checks() -> dg.AssetChecksDefinition:
    balances, history, marks = INVARIANT_CHECKS

    @dg.multi_asset_check(
        specs=[
            dg.AssetCheckSpec(
                balances.name,
                asset=balances.asset_key,
                description="Per customer, current_balance = sum(transaction_history.amount_usd).",
            ),
            dg.AssetCheckSpec(
                history.name,
                asset=history.asset_key,
                description=(
                    "Per event day, transaction_history's count and USD sum = billing_events'."
                ),
            ),
            dg.AssetCheckSpec(
                marks.name,
                asset=marks.asset_key,
                description=(
                    "Postgres' next offset per Kafka partition = the lake's (compared with "
                    "no batch mid-commit: under the lake barrier)."
                ),
            ),
        ],
        can_subset=True,
        # Whole-store reads, one at a time with the lake's other readers and rewriters.
        pool=LAKE_POOL,
        # The barrier not granted in time (a batch stuck mid-commit): tried again later.
        retry_policy=dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL),
    )
    def serving_invariants(
        context: dg.AssetCheckExecutionContext,
        postgres: PostgresServingResource,
        lake: DeltaLakeResource,
        kafka: KafkaResource,
    ):
        location = lake.location()
        selected = [key for key in INVARIANT_CHECKS if key in context.selected_asset_check_keys]
        # Kafka is asked before the barrier is taken: batches wait only for the comparison.
        partitions = _partitions(kafka) if marks in selected else []
        evaluations = {
            balances: lambda: balances_equal_history(postgres.url),
            history: lambda: history_matches_billing_events(postgres.url, location),
            marks: lambda: marks_match_lake(
                postgres.url, location, _topic_key(location, kafka.topic), partitions
            ),
        }
        try:
            with lake_at_rest(postgres.url):
                results = [_result(key, evaluations[key]) for key in selected]
        except LakeBusyError as exc:
            raise dg.Failure(str(exc)) from exc
        except ServingUnavailableError as exc:  # Postgres away: reported, not failed
            results = [_unavailable(key, exc) for key in selected]
        yield from results

    return serving_invariants


def _topic_key(location, topic: str) -> str:
    """The key the topic's marks are kept under (its current generation, topic_identity.py)."""
    generation = current_generation(location, topic)
    return generation.key if generation else topic


def _partitions(kafka: KafkaResource) -> list[int]:
    with kafka.client() as client:
        return sorted(client.end_offsets(kafka.topic))
