"""Dagster sensors: poll external systems, request runs, keep cursors."""
