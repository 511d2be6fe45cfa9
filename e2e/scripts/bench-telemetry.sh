#!/usr/bin/env bash
# Bench: 5,000 simulated agents on one controller (release build) reporting serving telemetry every 10 s,
# each with a baseline bundle A it benchmarked. Prints the controller's CPU share and RSS while ingesting,
# the store's growth extrapolated to a day, a 4-step rollout of B (30% slower on pi5-8g, gated on tokens/s)
# and the time to answer an A/B comparison over the whole fleet.
# Build first: cargo build --release -p alki-controller -p alkictl -p alki-e2e --bins
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-5000}
bin=target/release
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
grpc=127.0.0.1:${GRPC_PORT:-27170}
http=127.0.0.1:${HTTP_PORT:-27180}
RUST_LOG=warn "$bin/alki-controller" --data-dir "$work/data" --grpc-addr "$grpc" --http-addr "$http" \
  --heartbeat-seconds 10 --insecure-plaintext --insecure-agent-tokens >"$work/controller.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -s "$work/data/admin.token" ] && break; kill -0 "$pid" || { cat "$work/controller.log"; exit 1; }; sleep 0.1; done
export ALKI_CONTROLLER=http://$grpc ALKI_REGISTRY=$http ALKI_TOKEN_FILE="$work/data/admin.token"
for v in 1 2; do
  "$bin/make-tiny-model" --out "$work/tiny-v$v.gguf" --seed "$v" >/dev/null
  "$bin/alkictl" bundle pack "$work/tiny-v$v.gguf" --out "$work/layout-v$v" --tag "v$v" -o json >/dev/null
  "$bin/alkictl" bundle push "$work/layout-v$v" "acme/tiny:v$v" --insecure-plain-http -o json >/dev/null
done
ulimit -n 65536 2>/dev/null || true
"$bin/fleet-sim" --controller "http://$grpc" --admin-token-file "$work/data/admin.token" \
  --devices "$N" --heartbeat-secs 10 --telemetry-secs 10 --baseline acme/tiny:v1 \
  --bench --bundle acme/tiny:v2 --steps 10,25,50,100 --slow-class pi5-8g --slow-factor 0.7 \
  --min-tokens-per-second-ratio 0.9 --controller-pid "$pid" --data-dir "$work/data" --idle-secs "${IDLE:-60}"
