"""Great Expectations suites, one JSON file per dataset, versioned with the code.

Loaded by billing_dagster/quality.py and run as Dagster asset checks.
"""

from pathlib import Path

SUITES_DIR = Path(__file__).parent
