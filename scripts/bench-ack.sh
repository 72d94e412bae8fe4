#!/usr/bin/env bash
# The price of durable acknowledgements on one node (issue 10): counter `Send`s and `Call`s over
# HTTP with `[checkpoint] ack = "committed"` (default: acknowledged once the epoch is durable)
# and `"accepted"` (once queued), alternated per round on the same machine (bench-fsync.sh's
# A/B). One JSON line per run, labelled "ack". Compare within one run (the machine is noisy).
#   DURATION=8 ROUNDS=2 CONCURRENCY="64" bash scripts/bench-ack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SETTING=ack VALUES='"committed" "accepted"' MODES=${MODES:-"send call"} \
  CONCURRENCY=${CONCURRENCY:-64} exec bash scripts/bench-fsync.sh
