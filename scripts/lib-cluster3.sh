# Sourced by the three-node benchmarks (bench-failover.sh, bench-stop.sh, bench-idle3.sh; their
# Python side is scripts/cluster3.py): builds the release binary unless BIN names one, and
# makes a temporary ROOT for the nodes' data, removed on exit (KEEP=1 keeps it).
if [ -z "${BIN:-}" ]; then
  cargo build --release -p statemesh-node >&2
  BIN=target/release/statemesh
fi
ROOT=$(mktemp -d)
trap 'if [ -n "${KEEP:-}" ]; then echo "kept $ROOT" >&2; else rm -rf "$ROOT"; fi' EXIT
