#!/usr/bin/env bash
# Bench: 5,000 simulated agents on one controller (release build). Prints the figures fleet-sim measures;
# WEBHOOK=1 also delivers every event to a webhook and prints the delivery latency.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-5000}
bin=target/release
# Always the current code: a stale release binary would measure an older controller.
cargo build --release -q -p alki-controller -p alkictl -p alki-e2e --bins
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; [ -n "${KEEP_LOG:-}" ] && cp "$work/controller.log" "$KEEP_LOG"; rm -rf "$work"' EXIT
RUST_LOG=${CONTROLLER_LOG:-warn} "$bin/alki-controller" --data-dir "$work/data" --grpc-addr 127.0.0.1:${GRPC_PORT:-27070} --http-addr 127.0.0.1:${HTTP_PORT:-27080} \
  --heartbeat-seconds 10 --insecure-plaintext --insecure-agent-tokens >"$work/controller.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -s "$work/data/admin.token" ] && break; kill -0 "$pid" || { cat "$work/controller.log"; exit 1; }; sleep 0.1; done
"$bin/make-tiny-model" --out "$work/tiny.gguf" --seed 2 >/dev/null
export ALKI_CONTROLLER=http://127.0.0.1:${GRPC_PORT:-27070} ALKI_REGISTRY=127.0.0.1:${HTTP_PORT:-27080} ALKI_TOKEN_FILE="$work/data/admin.token"
"$bin/alkictl" bundle pack "$work/tiny.gguf" --out "$work/layout" --tag v2 -o json >/dev/null
"$bin/alkictl" bundle push "$work/layout" acme/tiny:v2 --insecure-plain-http -o json >/dev/null
ulimit -n 65536 2>/dev/null || true
"$bin/fleet-sim" --controller http://127.0.0.1:${GRPC_PORT:-27070} --admin-token-file "$work/data/admin.token" \
  --devices "$N" --heartbeat-secs 10 --bench --bundle acme/tiny:v2 --steps 10,25,50,100 \
  --controller-pid "$pid" --idle-secs "${IDLE:-30}" ${WEBHOOK:+--webhook}
