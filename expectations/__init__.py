"""Great Expectations suites for billing_events, balances and aggregates live here.

They arrive with the data-quality issue; the decode-level contract is enforced today by
billing_dagster/rules.py and quarantine/.
"""
