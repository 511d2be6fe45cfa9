#!/usr/bin/env bash
# Release build: alki-agent (profile `device`), alki-controller and alkictl for this machine and for each of $TARGETS (e.g.
# TARGETS=aarch64-unknown-linux-gnu: cross-built with Debian's gcc-aarch64-linux-gnu as linker), with the
# commit and target in their --version, packed as .deb packages (cargo-deb) with SHA256SUMS, into dist/ (or
# $OUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
export ALKI_GIT_COMMIT="${ALKI_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
out="${OUT:-dist}"
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet
fi
# The controller and alkictl in the release profile; the agent in the size-optimised `device` profile.
servers=(-p alki-controller -p alkictl)
cargo build --release --locked "${servers[@]}" --bins
cargo build --profile device --locked -p alki-agent --bins
mkdir -p "$out"
cargo deb -p alki-agent --profile device --no-build --output "$out/" >/dev/null
cargo deb -p alki-controller --no-build --output "$out/" >/dev/null
for target in ${TARGETS:-}; do
  gnu_arch="${target%%-*}"                       # aarch64, armv7 ...
  [ "$gnu_arch" = armv7 ] && cross=arm-linux-gnueabihf || cross="$gnu_arch-linux-gnu"
  command -v "$cross-gcc" >/dev/null || { echo "build.sh: $target needs $cross-gcc (apt-get install gcc-$cross)" >&2; exit 1; }
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
  env_target="${target//-/_}"
  export "CARGO_TARGET_${env_target^^}_LINKER=$cross-gcc" "CC_${env_target}=$cross-gcc" "AR_${env_target}=$cross-ar"
  cargo build --release --locked --target "$target" "${servers[@]}" --bins
  cargo build --profile device --locked --target "$target" -p alki-agent --bins
  # Already stripped by the profiles (the host strip cannot read a foreign binary).
  cargo deb -p alki-agent --profile device --target "$target" --no-build --no-strip --output "$out/" >/dev/null
  cargo deb -p alki-controller --target "$target" --no-build --no-strip --output "$out/" >/dev/null
done
(cd "$out" && sha256sum -- *.deb > SHA256SUMS)
ls -l "$out"
