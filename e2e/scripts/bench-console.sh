#!/usr/bin/env bash
# Bench of the web console (release build, real headless Chromium, TLS on as deployed): the controller's CPU
# during a 5,000-device rollout with 0 and then 10 consoles open, side by side; then, on the resulting store
# (5,000 devices and 51 rollouts), the time to the first rendered data of the fleet and rollout pages; and the
# size of the embedded console files. (Over TLS the browser speaks HTTP/2, so ten consoles' event streams share
# one connection; over plain HTTP/1.1 a browser opens at most six connections to a host.)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-5000}
bin=target/release
cargo build --release -q -p alki-controller -p alkictl -p alki-e2e --bins
cargo build --release -q -p alki-e2e --example bench-console
bench=target/release/examples/bench-console
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
start_controller() { # data dir, extra flags...
  local data=$1; shift
  RUST_LOG=warn "$bin/alki-controller" --data-dir "$data" --grpc-addr 127.0.0.1:27170 --http-addr 127.0.0.1:27180 \
    --heartbeat-seconds 10 "$@" >>"$work/controller.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do [ -s "$data/admin.token" ] && curl -sk -o /dev/null "https://127.0.0.1:27180/healthz" -m 1 && break
    kill -0 "$pid" || { cat "$work/controller.log"; exit 1; }; sleep 0.1; done
}
ulimit -n 65536 2>/dev/null || true
"$bin/make-tiny-model" --out "$work/tiny.gguf" --seed 2 >/dev/null
for consoles in 0 10; do
  data="$work/data-$consoles"
  mkdir -p "$data"
  "$bench" seed "$data" 50 >/dev/null
  # The simulator multiplexes devices over a few connections with an agent token instead of certificates.
  start_controller "$data" --insecure-agent-tokens
  export ALKI_CONTROLLER=https://127.0.0.1:27170 ALKI_REGISTRY=127.0.0.1:27180 ALKI_TOKEN_FILE="$data/admin.token" \
    ALKI_CA_FILE="$data/pki/ca.crt"
  "$bin/alkictl" bundle pack "$work/tiny.gguf" --out "$work/layout-$consoles" --tag v2 -o json >/dev/null
  "$bin/alkictl" bundle push "$work/layout-$consoles" acme/tiny:v2 -o json >/dev/null
  "$bench" consoles https://127.0.0.1:27180 "$data/admin.token" "$pid" "$consoles" &
  watcher=$!
  "$bin/fleet-sim" --controller https://127.0.0.1:27170 --ca-file "$data/pki/ca.crt" --admin-token-file "$data/admin.token" --devices "$N" \
    --heartbeat-secs 10 --bench --bundle acme/tiny:v2 --steps 10,25,50,100 --idle-secs 3 | grep -E "rollout|connected" || true
  wait "$watcher"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
done
# The store of the last run: 5,000 devices, 51 rollouts.
start_controller "$work/data-10"
"$bench" load https://127.0.0.1:27180 "$work/data-10/admin.token" "${RUNS:-7}"
raw=$(cat $(find controller/ui -type f) | wc -c)
gz=$(for f in $(find controller/ui -type f); do gzip -9c "$f"; done | wc -c)
echo "console files: $(find controller/ui -type f | wc -l) files, $raw bytes, $gz bytes gzip -9 (each file compressed)"
