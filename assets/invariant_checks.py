"""The serving invariants (billing_dagster/invariants.py) as Dagster asset checks.

They run in their own job, `check_serving_invariants`, every 15 minutes and in the daily
reconciliation, queued in the ingest lane so they never see a half-applied batch; a
failure raises the "Serving Invariant Broken" alert (docs/runbooks/serving-invariant-broken.md).
"""

import dagster as dg

from assets.ingest import CUSTOMER_BALANCES, INGEST_POOL, TRANSACTION_HISTORY
from billing_dagster.invariants import (
    BALANCES_EQUAL_HISTORY,
    HISTORY_MATCHES_BILLING_EVENTS,
    MARKS_MATCH_LAKE,
    InvariantResult,
    balances_equal_history,
    history_matches_billing_events,
    marks_match_lake,
)
from billing_dagster.postgres_db import ServingUnavailableError
from billing_dagster.topic_identity import current_generation
from resources import DeltaLakeResource, KafkaResource, PostgresServingResource


def _result(check: dg.AssetCheckKey, evaluate) -> dg.AssetCheckResult:
    try:
        result: InvariantResult = evaluate()
    except ServingUnavailableError as exc:
        return dg.AssetCheckResult(
            check_name=check.name,
            asset_key=check.asset_key,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=str(exc),
        )
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
                    "Postgres' next offset per Kafka partition = the lake's (checked between "
                    "ingest runs: this job queues in their lane)."
                ),
            ),
        ],
        can_subset=True,
        # Marks are compared between batches only, whoever launches the check.
        pool=INGEST_POOL,
    )
    def serving_invariants(
        context: dg.AssetCheckExecutionContext,
        postgres: PostgresServingResource,
        lake: DeltaLakeResource,
        kafka: KafkaResource,
    ):
        location = lake.location()
        evaluations = {
            balances: lambda: balances_equal_history(postgres.url),
            history: lambda: history_matches_billing_events(postgres.url, location),
            marks: lambda: marks_match_lake(
                postgres.url, location, _topic_key(location, kafka.topic), _partitions(kafka)
            ),
        }
        for key in context.selected_asset_check_keys:
            yield _result(key, evaluations[key])

    return serving_invariants


def _topic_key(location, topic: str) -> str:
    """The key the topic's marks are kept under (its current generation, topic_identity.py)."""
    generation = current_generation(location, topic)
    return generation.key if generation else topic


def _partitions(kafka: KafkaResource) -> list[int]:
    with kafka.client() as client:
        return sorted(client.end_offsets(kafka.topic))
