#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each (default 600), one after the other, one
# libFuzzer job each, under nice, and prints a summary: executions, corpus size, crashes.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz). Each run starts from the committed
# seeds in fuzz/corpus/<target>/ and grows fuzz/work/corpus/<target>/ (kept between runs, not committed);
# logs go to fuzz/work/logs/. A crash stops that target's run and is saved in fuzz/artifacts/<target>/;
# reproduce it with `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>` (from fuzz/).
# Exits 1 when any target crashed.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(gguf oci_manifest extract signing_payload agent_config trust_policy)
fi

# The machine is shared: one compile job, low priority.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
mkdir -p work/logs
nice -n 15 cargo +nightly fuzz build >work/logs/build.log 2>&1 || {
  tail -30 work/logs/build.log
  exit 2
}

summary=()
failed=0
for target in "${targets[@]}"; do
  mkdir -p "work/corpus/$target" "artifacts/$target"
  marker="work/logs/$target.start"
  touch "$marker"
  extra=()
  tmp="${TMPDIR:-/tmp}"
  if [ "$target" = extract ]; then
    # Archives a little larger than the seeds; each run extracts into a fresh directory, in memory when /dev/shm is there.
    extra+=(-max_len=32768)
    [ -d /dev/shm ] && tmp=/dev/shm
  fi
  echo "== $target: ${seconds}s" >&2
  started=$(date +%s)
  set +e
  TMPDIR="$tmp" nice -n 15 cargo +nightly fuzz run "$target" "work/corpus/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=25 -rss_limit_mb=2048 "${extra[@]}" \
    >"work/logs/$target.log" 2>&1
  rc=$?
  set -e
  elapsed=$(($(date +%s) - started))
  log="work/logs/$target.log"
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  if [ -z "$execs" ]; then
    execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
  fi
  corpus=$(grep -oE 'corp: [0-9]+/[0-9a-zA-Z]+' "$log" | tail -1 | sed 's/corp: //' || true)
  crashes=$(find "artifacts/$target" -type f -newer "$marker" | wc -l)
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    echo "!! $target: exit $rc; see $log and artifacts/$target/" >&2
    grep -m 3 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" >&2 || true
  fi
  summary+=("$(printf '%-16s %8s %14s %14s %8s %5s' "$target" "${elapsed}s" "${execs:-?}" "${corpus:-?}" "$crashes" "$rc")")
done

{
  printf '%-16s %8s %14s %14s %8s %5s\n' target time executions corpus crashes exit
  printf '%s\n' "${summary[@]}"
} | tee work/summary.txt
exit "$failed"
