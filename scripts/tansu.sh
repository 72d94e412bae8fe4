#!/usr/bin/env bash
# The Kafka-protocol broker of the tests and examples: tansu (crates.io, in-memory engine),
# built once into target/tools/tansu (a debug build, about 4 minutes on 2 cores).
#
#   scripts/tansu.sh install                      builds it if missing, prints the binary's path
#   scripts/tansu.sh [ADDR] [TOPIC:PARTITIONS...] runs a broker on ADDR (127.0.0.1:9092) and
#                                                 creates the topics; stops it on exit
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/tools/tansu/bin/tansu"
if [ ! -x "$bin" ]; then
  echo "building the Kafka test broker (tansu 0.6.0) into target/tools/tansu, once (about 4 minutes)" >&2
  CARGO_TARGET_DIR="$root/target/tools/tansu-build" cargo install tansu --version 0.6.0 \
    --no-default-features --features dynostore --locked --debug --root "$root/target/tools/tansu" >&2
  rm -rf "$root/target/tools/tansu-build"
fi
if [ "${1:-}" = install ]; then
  echo "$bin"
  exit 0
fi
addr="${1:-127.0.0.1:9092}"
[ $# -gt 0 ] && shift
"$bin" broker --listener-url "tcp://$addr" --advertised-listener-url "tcp://$addr" \
  --storage-engine memory://tansu/ &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 200); do
  (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null && break
  sleep 0.1
done
for t in "$@"; do
  "$bin" topic create "${t%%:*}" --partitions "${t##*:}" --broker "tcp://$addr" >&2
done
echo "Kafka broker (tansu) on $addr" >&2
wait $pid
