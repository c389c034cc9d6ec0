"""Dagster assets: thin wiring from domain functions in billing_dagster/ to I/O."""
