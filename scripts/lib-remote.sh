# Shared by the remote-function benchmarks (sourced, from the repository's root): the StateFun
# 3.3 Python SDK's venv (created under target/py/statefun3 if missing, as the test harness does),
# a scratch directory with background processes stopped on exit, and a wait for a log line.
PY=target/py/statefun3/bin/python
if [ ! -x "$PY" ] || [ ! -f target/py/statefun3/.installed ]; then
  rm -rf target/py/statefun3 && python3 -m venv target/py/statefun3
  target/py/statefun3/bin/pip install --quiet apache-flink-statefun==3.3.0 aiohttp==3.14.5 >&2
  printf 'apache-flink-statefun==3.3.0 aiohttp==3.14.5' > target/py/statefun3/.installed
fi
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
wait_line() { for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for $1" >&2; exit 1; }
