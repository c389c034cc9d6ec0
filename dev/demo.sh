#!/usr/bin/env bash
# Sets up (dev/setup.sh demo) and runs the demo: embedded broker, Postgres, a local lake,
# synthetic events and the Dagster UI on http://127.0.0.1:3000. Extra flags go to
# `billing-dagster demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
# Apache Kafka and Debezium (--broker kafka, --source cdc) need the Java side of the setup.
case " $* " in
  *" kafka "* | *"--broker=kafka"* | *" cdc "* | *"--source=cdc"*) dev/setup.sh test ;;
  *) dev/setup.sh demo ;;
esac
exec .venv/bin/billing-dagster demo "$@"
