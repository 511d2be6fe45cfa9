#!/usr/bin/env bash
# Packing throughput and GGUF metadata cost (release build):
#  1. `alkictl bundle pack` of a 1 GiB GGUF (random tensor data) against `openssl dgst -sha256` of the same
#     file, warm page cache for both, best of 3 each, with the default copy and with `--link` (hard link,
#     no copy). Goal: pack >= 0.8x openssl's throughput (pack hashes and copies in one pass; openssl only
#     hashes).
#  2. Reading the metadata of a GGUF with a 256k-token vocabulary (tokens, scores, types): wall time and
#     peak memory of `alkictl bundle pack` on it (metadata read + copying a ~6 MB file; the arrays are
#     skipped, never held).
# Usage: e2e/scripts/bench-pack.sh [SIZE_MIB]   (default 1024). Needs ~3x SIZE of free space in $TMPDIR.
# ALKICTL=path uses that binary instead of building target/release/alkictl.
set -euo pipefail
cd "$(dirname "$0")/../.."
size_mib="${1:-1024}"
if [ -z "${ALKICTL:-}" ]; then
  cargo build --release --quiet -p alkictl --bin alkictl
fi
alkictl="${ALKICTL:-$PWD/target/release/alkictl}"
work="$(mktemp -d "${TMPDIR:-/tmp}/alki-bench-pack.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# A GGUF v3 file: llama metadata, optionally a vocabulary of N tokens, one F32 tensor of the given bytes.
gguf() {
  python3 - "$@" <<'PY'
import struct, sys, os
out, data_bytes, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def s(x):
    b = x.encode(); return struct.pack('<Q', len(b)) + b
kv = []
def kv_str(k, v): kv.append(s(k) + struct.pack('<I', 8) + s(v))
def kv_u32(k, v): kv.append(s(k) + struct.pack('<I', 4) + struct.pack('<I', v))
kv_str('general.architecture', 'llama'); kv_str('general.name', 'bench'); kv_u32('general.file_type', 0)
kv_u32('llama.context_length', 4096); kv_u32('llama.embedding_length', 64); kv_u32('llama.block_count', 2)
kv_u32('llama.attention.head_count', 4)
if vocab:
    kv_str('tokenizer.ggml.model', 'llama')
    toks = b''.join(s('tok%06d' % i) for i in range(vocab))
    kv.append(s('tokenizer.ggml.tokens') + struct.pack('<IIQ', 9, 8, vocab) + toks)
    kv.append(s('tokenizer.ggml.scores') + struct.pack('<IIQ', 9, 6, vocab) + struct.pack('<%df' % vocab, *([0.0] * vocab)))
    kv.append(s('tokenizer.ggml.token_type') + struct.pack('<IIQ', 9, 5, vocab) + struct.pack('<%di' % vocab, *([1] * vocab)))
n = data_bytes // 4
tensor = s('w') + struct.pack('<I', 1) + struct.pack('<Q', n) + struct.pack('<I', 0) + struct.pack('<Q', 0)
head = b'GGUF' + struct.pack('<IQQ', 3, 1, len(kv)) + b''.join(kv) + tensor
head += b'\0' * ((32 - len(head) % 32) % 32)
with open(out, 'wb') as f:
    f.write(head)
    left = n * 4
    while left:
        chunk = os.urandom(min(left, 16 << 20)); f.write(chunk); left -= len(chunk)
PY
}

echo "==> generating a ${size_mib} MiB GGUF"
gguf "$work/big.gguf" $((size_mib << 20)) 0
bytes=$(stat -c %s "$work/big.gguf")
cat "$work/big.gguf" >/dev/null  # warm the page cache

best() { # best wall seconds of 3 runs of "$@"
  local best=""
  for _ in 1 2 3; do
    rm -rf "$work/out"
    local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N)
    best=$(python3 -c "t=$t1-$t0; b='$best'; print(t if not b else min(t, float(b)))")
  done
  echo "$best"
}
openssl_s=$(best openssl dgst -sha256 "$work/big.gguf")
pack_s=$(best "$alkictl" -o json bundle pack "$work/big.gguf" --out "$work/out" --tag bench)
link_s=$(best "$alkictl" -o json bundle pack --link "$work/big.gguf" --out "$work/out" --tag bench)
python3 - "$bytes" "$openssl_s" "$pack_s" "$link_s" <<'PY'
import sys
b, o, p, l = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
mib = b / (1 << 20)
print(f"openssl dgst -sha256        : {o:6.2f} s  {mib / o:7.0f} MiB/s")
print(f"alkictl bundle pack         : {p:6.2f} s  {mib / p:7.0f} MiB/s  (hash + in-kernel copy, one read)")
print(f"alkictl bundle pack --link  : {l:6.2f} s  {mib / l:7.0f} MiB/s  (hash + hard link)")
print(f"pack / openssl              : {o / p:.2f}x, with --link {o / l:.2f}x  (goal >= 0.80x)")
PY
rm -rf "$work/out" "$work/big.gguf"

echo "==> a GGUF with a 256k-token vocabulary"
gguf "$work/vocab.gguf" 4096 262144
echo "file: $(stat -c %s "$work/vocab.gguf") bytes"
/usr/bin/time -f "alkictl bundle pack (metadata read + copy): %e s wall, %M KiB max RSS" \
  "$alkictl" -o json bundle pack "$work/vocab.gguf" --out "$work/vocab-out" --tag bench >/dev/null
