"""The Dagster concurrency pools of the pipeline (limits: dev/dagster.yaml and the lanes).

INGEST_POOL holds the ingest step of every run that reads Kafka offsets, whoever launched
it (sensor, replay, UI Materialize, backfill, re-execution); its limit is the number of
lanes (BILLING_INGEST_LANES), set on the instance by the offsets sensor. The run queue
keeps one run per lane on top of it (the `billing/lane` tag, dev/dagster.yaml).

LAKE_POOL holds the steps that rewrite lake tables beside the lanes or read the lake
whole: the revenue refresh, reconciliation, the invariant checks, compaction, vacuum. One
at a time (the pools' default limit, 1). Those that compare stores also take the lake
barrier (billing_dagster/lake_barrier.py) so no batch is half-committed while they read.
"""

INGEST_POOL = "billing_ingest"
LAKE_POOL = "billing_lake"
