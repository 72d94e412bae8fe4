#!/usr/bin/env bash
# Everything the demo needs besides statemesh: a Kafka-protocol broker on 127.0.0.1:9092 with
# the topics "features" and "predictions" (tansu, built once into target/tools), and the
# model's function server on 127.0.0.1:8000 (StateFun 2.0.0 Python SDK, in target/py/bandit).
# Stops both on Ctrl-C.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/py/bandit"
if ! "$venv/bin/python" -c "import statefun, kafka, aiohttp" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet apache-flink-statefun==2.0.0 aiohttp==3.14.5 kafka-python==2.3.3
fi
"$root/scripts/tansu.sh" install > /dev/null
"$root/scripts/tansu.sh" 127.0.0.1:9092 features:1 predictions:1 &
broker=$!
"$venv/bin/python" "$root/examples/bandit/model.py" 8000 &
model=$!
trap 'kill $broker $model 2>/dev/null || true' EXIT INT TERM
wait
