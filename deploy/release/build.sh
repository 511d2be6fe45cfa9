#!/usr/bin/env bash
# Release build: alki-agent, alki-controller and alkictl for this machine, with the commit and target in
# their --version, packed as .deb packages (cargo-deb) with their SHA256SUMS, into dist/ (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
export ALKI_GIT_COMMIT="${ALKI_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
out="${OUT:-dist}"
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet
fi
cargo build --release --locked -p alki-agent -p alki-controller -p alkictl --bins
mkdir -p "$out"
cargo deb -p alki-agent --no-build --output "$out/" >/dev/null
cargo deb -p alki-controller --no-build --output "$out/" >/dev/null
(cd "$out" && sha256sum -- *.deb > SHA256SUMS)
ls -l "$out"
