#!/usr/bin/env bash
# Sets up (dev/setup.sh test) and runs the whole test suite against real local servers.
set -euo pipefail
cd "$(dirname "$0")/.."
dev/setup.sh test
exec .venv/bin/python -m pytest "$@"
