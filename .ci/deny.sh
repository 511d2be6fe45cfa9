#!/usr/bin/env bash
# cargo-deny against deny.toml: licenses, bans and sources must pass (CI fails otherwise). Advisories need the
# RustSec database, cloned from GitHub: they are checked (and fail CI) when it can be fetched; when it cannot,
# this says plainly that advisories were NOT checked, and does not fail.
set -euo pipefail
cd "$(dirname "$0")/.."

DENY_VERSION=0.20.2
if ! command -v cargo-deny >/dev/null; then
  # Installed once into ~/.cargo/bin, which later runs on the same machine reuse.
  echo "deny: installing cargo-deny $DENY_VERSION" >&2
  nice -n 15 cargo install cargo-deny --locked --version "$DENY_VERSION" --quiet
fi

echo "deny: cargo deny check bans licenses sources"
if ! out=$(cargo deny check --hide-inclusion-graph bans licenses sources 2>&1); then
  echo "$out"
  echo "deny: FAILED (policy in deny.toml)" >&2
  exit 1
fi
warnings=$(grep -c '^warning\[' <<<"$out" || true)
echo "deny: bans, licenses, sources: ok ($warnings warnings, e.g. crates in two versions; \`cargo deny check bans\` lists them)"

if fetch_log=$(cargo deny fetch db 2>&1); then
  echo "deny: cargo deny check advisories"
  cargo deny --log-level error check advisories
  echo "deny: advisories: ok"
else
  echo "deny: ADVISORIES NOT CHECKED: the RustSec advisory database could not be fetched:" >&2
  echo "$fetch_log" | grep -m 3 -E 'fatal|ERROR' | sed 's/^/deny:   /' >&2 || true
fi
