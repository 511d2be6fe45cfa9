#!/usr/bin/env bash
# Cross-builds llama-server for the arm64 devices from the same pinned llama.cpp sources as the x86 build
# (e2e/scripts/build-llama-server.sh fetches them), into a cache outside the clone keyed by version and tuning,
# and prints the directory holding llama-server and its shared libraries: what `alkictl runtime push
# --platform` packs. A second run with the same version reuses the cache and takes a second.
#
#   build-llama-arm64.sh baseline   armv8-a: every 64-bit Pi (Pi 3, Pi 4's Cortex-A72) and any arm64 board
#   build-llama-arm64.sh a76        armv8.2-a+dotprod+fp16: Pi 5's Cortex-A76 (and Jetson Orin's A78AE) run
#                                   llama.cpp's int8 dot-product and fp16 kernels; pushed with the features
#                                   asimddp+asimdhp so only CPUs that have them choose it
#
# Needs the cross compilers (Debian gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu) and cmake.
set -euo pipefail
cd "$(dirname "$0")/../.."

tuning="${1:?usage: build-llama-arm64.sh baseline|a76}"
case "$tuning" in
  baseline) march=armv8-a ;;
  a76) march=armv8.2-a+dotprod+fp16 ;;
  *) echo "build-llama-arm64.sh: unknown tuning $tuning (baseline or a76)" >&2; exit 2 ;;
esac

version="${LLAMA_CPP_VERSION:-11434.0.0}"
cache="${ALKI_CACHE_DIR:-$HOME/.cache/alki}/llama-cpp-$version"
build="$cache/build-arm64-$tuning"
bin="$build/bin"
if [ -x "$bin/llama-server" ] && [ -f "$build/.complete" ]; then
  echo "$bin"
  exit 0
fi
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ cmake; do
  command -v "$tool" >/dev/null || { echo "build-llama-arm64.sh: $tool is missing (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake)" >&2; exit 1; }
done
# The sources: the x86 build script fetches them into the same cache (and builds the host tools the tests use).
[ -d "$cache/src/llama.cpp" ] || e2e/scripts/build-llama-server.sh >/dev/null
src="$cache/src/llama.cpp"

# Only llama-server: nothing else runs on a device. No CURL (the agent fetches models), no native tuning
# (the build machine is x86), OpenMP off (the cross toolchain's libgomp would have to ship beside it).
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
  -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER \
  -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_CPU_ARM_ARCH="$march" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$build" -j"$(nproc)" --target llama-server >&2
# Only what llama-server loads stays beside it (the other tools' libraries are not built or shipped).
touch "$build/.complete"
echo "$bin"
