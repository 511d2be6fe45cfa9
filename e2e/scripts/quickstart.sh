#!/usr/bin/env bash
# Runs the whole system locally: a controller with its embedded registry and store, one agent with a real
# llama-server, a tiny model packed, pushed and rolled out, and a completion served through the agent.
# Everything lives in a temporary directory; Ctrl-C stops it all. Pass --exit to stop after the completion.
set -euo pipefail
cd "$(dirname "$0")/../.."

llama_bin="$(e2e/scripts/build-llama-server.sh)"
cargo build --workspace --bins --quiet
bin=target/debug
work="$(mktemp -d /tmp/alki-quickstart.XXXXXX)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port=$(port); http_port=$(port); front_port=$(port)
export ALKI_CONTROLLER="https://127.0.0.1:$grpc_port" ALKI_REGISTRY="127.0.0.1:$http_port"

echo "==> a signing key (alkictl key generate; the controller and the agent trust its public half)"
export ALKI_KEY_PASSWORD="quickstart-$$"
"$bin/alkictl" key generate --output-prefix "$work/release" >/dev/null

echo "==> controller (data in $work/controller, logs in $work/*.log)"
"$bin/alki-controller" --data-dir "$work/controller" --grpc-addr "127.0.0.1:$grpc_port" \
  --trusted-key "$work/release.pub" \
  --http-addr "127.0.0.1:$http_port" >"$work/controller.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -f "$work/controller/admin.token" ] && break; sleep 0.2; done
# TLS is on by default with the CA the controller made on first start: alkictl and the agent trust it.
export ALKI_TOKEN_FILE="$work/controller/admin.token" ALKI_CA_FILE="$work/controller/pki/ca.crt"

echo "==> a tiny llama model, packed and pushed as acme/tiny:v1"
"$bin/make-tiny-model" --out "$work/tiny.gguf" --name alki-tiny >/dev/null
"$bin/alkictl" bundle pack "$work/tiny.gguf" --out "$work/bundle" --tag v1
"$bin/alkictl" bundle push "$work/bundle" acme/tiny:v1
"$bin/alkictl" bundle sign acme/tiny:v1 --key "$work/release.key"

echo "==> agent pi-001 (front port $front_port)"
# A one-use bootstrap token: the agent enrolls with it on first start, then every session is mTLS.
"$bin/alkictl" enroll token create --labels site=lab --uses 1 --expires 1h -o json | json 'd["secret"]' >"$work/bootstrap.token"
cat >"$work/trust.toml" <<TOML
[[repository]]
pattern = "*"
keys = ["$work/release.pub"]
TOML
cat >"$work/agent.toml" <<TOML
device_id = "pi-001"
trust_policy = "$work/trust.toml"
data_dir = "$work/agent"
labels = { site = "lab" }

[controller]
url = "$ALKI_CONTROLLER"
ca_file = "$ALKI_CA_FILE"
bootstrap_token_file = "$work/bootstrap.token"

[runtime]
llama_server = "$llama_bin/llama-server"
front_addr = "127.0.0.1:$front_port"
TOML
LD_LIBRARY_PATH="$llama_bin" "$bin/alki-agent" run --config "$work/agent.toml" >"$work/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 150); do
  "$bin/alkictl" devices list -o json | json '[x["id"] for x in d if x["connected"]]' | grep -q pi-001 && break
  sleep 0.2
done

echo "==> rollout of acme/tiny:v1 to site=lab"
"$bin/alkictl" rollout create --bundle acme/tiny:v1 --selector site=lab
for _ in $(seq 600); do
  phase=$("$bin/alkictl" devices list -o json | json '[x["phase"] for x in d if x["id"]=="pi-001"][0]')
  [ "$phase" = active ] && break
  [ "$phase" = failed ] && { "$bin/alkictl" devices list; exit 1; }
  sleep 0.5
done
"$bin/alkictl" devices list
"$bin/alkictl" rollout list

echo "==> a completion through the agent's front port"
curl -sS "http://127.0.0.1:$front_port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}' | json 'd["choices"][0]["message"]["content"]'

if [ "${1:-}" = --exit ]; then exit 0; fi
echo "==> running; try: ALKI_CONTROLLER=$ALKI_CONTROLLER ALKI_TOKEN_FILE=$ALKI_TOKEN_FILE ALKI_CA_FILE=$ALKI_CA_FILE $bin/alkictl devices list"
echo "    the web console: https://127.0.0.1:$http_port/ui/ (its certificate is signed by $ALKI_CA_FILE;"
echo "    log in with the token in $ALKI_TOKEN_FILE)"
echo "    Ctrl-C stops everything."
wait
