#!/usr/bin/env bash
# Installs everything billing-dagster needs on a fresh Debian machine; safe to re-run.
#   dev/setup.sh demo   Python deps + Debian postgresql and redis-server (the Celery engine's
#                       broker); the demo broker is embedded
#   dev/setup.sh test   the above + a JDK and Maven, and via Maven the Apache Kafka jars and
#                       Kafka Connect with the Debezium PostgreSQL connector
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"

packages=()
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || packages+=(postgresql)
command -v redis-server >/dev/null || packages+=(redis-server)
if [ "$mode" = test ]; then
  command -v java >/dev/null || packages+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || packages+=(maven)
fi
if [ "${#packages[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${packages[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python 3.11 or newer is needed ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ] \
   || [ dev/constraints.txt -nt .venv/.installed ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c dev/constraints.txt -e ".[dev,demo]"
  touch .venv/.installed
fi

if [ "$mode" = test ]; then
  if ! compgen -G "dev/kafka/libs/kafka_2.13-*.jar" >/dev/null || [ dev/kafka/pom.xml -nt dev/kafka/libs ]; then
    echo "setup: fetching Apache Kafka jars with Maven"
    rm -rf dev/kafka/libs
    mvn -q -B -f dev/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=libs
  fi
  if ! compgen -G "dev/debezium/libs/debezium-connector-postgres-*.jar" >/dev/null \
     || [ dev/debezium/pom.xml -nt dev/debezium/libs ]; then
    echo "setup: fetching Kafka Connect and the Debezium PostgreSQL connector with Maven"
    rm -rf dev/debezium/libs
    mvn -q -B -f dev/debezium/pom.xml dependency:copy-dependencies -DoutputDirectory=libs
  fi
fi
