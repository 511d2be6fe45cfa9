#!/usr/bin/env bash
# Benchmarks the controller's registry against CNCF distribution (Debian's docker-registry) on loopback:
# chunked push, GET, a Range GET of the last MiB, and peak RSS, for one large blob (1 GiB by default).
# A command, not a test. Needs `apt-get install -y docker-registry` and about 3x the blob size on disk.
#
#   e2e/scripts/bench-registry.sh [--size-mib N] [--chunk-mib N] [--gets N] [--work-dir DIR] [--json]
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v docker-registry >/dev/null || {
  echo "docker-registry is not installed; install it with: apt-get install -y docker-registry" >&2
  exit 1
}
cargo build --release -p alki-controller --bin alki-controller
exec cargo run --release -p alki-e2e --example bench-registry -- \
  --controller "$(pwd)/target/release/alki-controller" "$@"
