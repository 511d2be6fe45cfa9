#!/usr/bin/env bash
# Packs GGUF files into a bundle, pushes it and signs it (index and every variant) with cosign's key-based
# scheme. Runs in any CI: the private key and its password come from the environment, never the command line.
#
#   ALKI_REGISTRY         host:port of the registry (the controller's embedded one, or an external registry)
#   ALKI_TOKEN            a token of role push or operator for that registry
#   ALKI_SIGNING_KEY      the encrypted private key's PEM text (from `alkictl key generate` or `cosign
#                         generate-key-pair`), e.g. a CI secret; or ALKI_SIGNING_KEY_FILE, a path to it
#   ALKI_KEY_PASSWORD     its password (COSIGN_PASSWORD works too)
#   ALKICTL               the alkictl binary (default: alkictl on PATH)
#   ALKI_CA_FILE          the controller's CA certificate, when the registry uses it (optional)
#
# Usage: release-bundle.sh REPOSITORY TAG MODEL.gguf [MORE.gguf ...]
#   e.g. release-bundle.sh acme/qwen2.5-0.5b v1.4.0 qwen-Q4_K_M.gguf qwen-Q8_0.gguf
# Optional: LICENSE_FILE, README_FILE (shipped as doc layers), EXTRA_PUSH_FLAGS (e.g. --insecure-plain-http
# for a registry on a private test network only).
set -euo pipefail

if [ "$#" -lt 3 ]; then
  echo "usage: $0 REPOSITORY TAG MODEL.gguf [MORE.gguf ...]" >&2
  exit 2
fi
repository="$1"; tag="$2"; shift 2
alkictl="${ALKICTL:-alkictl}"
: "${ALKI_REGISTRY:?set ALKI_REGISTRY to the registry host:port}"
: "${ALKI_TOKEN:?set ALKI_TOKEN to a push token for the registry}"
if [ -z "${ALKI_KEY_PASSWORD:-}" ] && [ -z "${COSIGN_PASSWORD:-}" ]; then
  echo "set ALKI_KEY_PASSWORD (or COSIGN_PASSWORD) to the signing key's password" >&2
  exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
key_file="${ALKI_SIGNING_KEY_FILE:-}"
if [ -z "$key_file" ]; then
  : "${ALKI_SIGNING_KEY:?set ALKI_SIGNING_KEY (the private key PEM) or ALKI_SIGNING_KEY_FILE}"
  key_file="$work/signing.key"
  (umask 077; printf '%s\n' "$ALKI_SIGNING_KEY" >"$key_file")
fi

ca_flags=()
[ -n "${ALKI_CA_FILE:-}" ] && ca_flags=(--ca-file "$ALKI_CA_FILE")
pack_flags=()
[ -n "${LICENSE_FILE:-}" ] && pack_flags+=(--license-file "$LICENSE_FILE")
[ -n "${README_FILE:-}" ] && pack_flags+=(--readme "$README_FILE")
# shellcheck disable=SC2206 # word splitting of the optional flags is intended
extra=(${EXTRA_PUSH_FLAGS:-})

echo "==> packing $* as $repository:$tag"
"$alkictl" bundle pack "$@" --out "$work/bundle" --tag "$tag" "${pack_flags[@]}"
echo "==> pushing to $ALKI_REGISTRY"
"$alkictl" "${ca_flags[@]}" bundle push "$work/bundle" "$repository:$tag" "${extra[@]}"
echo "==> signing (index and every variant)"
"$alkictl" "${ca_flags[@]}" bundle sign "$repository:$tag" --key "$key_file" "${extra[@]}"
"$alkictl" "${ca_flags[@]}" bundle inspect "$repository:$tag" "${extra[@]}"
