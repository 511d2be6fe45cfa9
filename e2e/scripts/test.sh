#!/usr/bin/env bash
# The whole test suite: unit, integration and end-to-end tests, the last with a real llama-server
# built from source (cached under ~/.cache/alki after the first run).
set -euo pipefail
cd "$(dirname "$0")/../.."

ALKI_LLAMA_BIN_DIR="$(e2e/scripts/build-llama-server.sh)"
export ALKI_LLAMA_BIN_DIR
# The deployment files (Kubernetes manifests, Helm chart, Compose): validated offline with real helm and compose.
deploy/kubernetes/validate.sh
# The end-to-end tests start the real binaries, so build them all first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
# The packages: a release build packed as .deb, installed with dpkg, checked, removed and purged. It changes the
# machine (a system user, /etc/alki), so it runs where the suite runs as root (CI, throwaway machines).
if [ "$(id -u)" = 0 ] && command -v dpkg >/dev/null; then
  # arm64 too when the cross linker is there (.ci/run installs it).
  targets=""; command -v aarch64-linux-gnu-gcc >/dev/null && targets=aarch64-unknown-linux-gnu
  TARGETS="$targets" deploy/release/build.sh >/dev/null
  deploy/packages/test-deb.sh dist
  if [ -n "$targets" ]; then
    # The arm64 device, emulated: the release arm64 agent and the arm64 llama.cpp builds (cross-compiled once,
    # cached under ~/.cache/alki) under qemu-aarch64 against the x86 controller.
    ALKI_ARM64_LLAMA_BASELINE="$(deploy/release/build-llama-arm64.sh baseline)"
    ALKI_ARM64_LLAMA_A76="$(deploy/release/build-llama-arm64.sh a76)"
    ALKI_ARM64_AGENT="$PWD/target/aarch64-unknown-linux-gnu/device/alki-agent"
    export ALKI_ARM64_LLAMA_BASELINE ALKI_ARM64_LLAMA_A76 ALKI_ARM64_AGENT
    cargo test -p alki-e2e --test emulated_arm64 -- --ignored --nocapture
    # The container images (amd64 + arm64, no daemon): built, pushed to a local registry, inspected, run.
    deploy/container/build.sh dist
    deploy/container/test-image.sh dist
  fi
else
  echo "test.sh: the package test needs root and dpkg; skipped"
fi
