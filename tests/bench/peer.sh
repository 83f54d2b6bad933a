#!/usr/bin/env bash
# peer.sh - build llama.cpp's reference tools once, CPU-only, to compare
# moed against (perplexity today; later benchmark work reuses the cache).
#
# llama.cpp comes from the llama-cpp-python sdist on PyPI, which vendors
# it, so only the ordinary pip client is needed. The build lives outside
# the repository, in $MOED_PEER_DIR (default ~/.cache/moed-peer/<version>),
# and is reused: a second run prints the path and builds nothing.
#
#   tests/bench/peer.sh [TARGET...]     default target: llama-perplexity
#
# Prints the directory holding the built binaries on its last line.
# Environment: MOED_PEER_VERSION (llama-cpp-python version, default below),
# MOED_PEER_DIR, MOED_PEER_JOBS (default 2), PYTHON (default python3).
set -euo pipefail

ver="${MOED_PEER_VERSION:-0.3.36}"
dir="${MOED_PEER_DIR:-$HOME/.cache/moed-peer/$ver}"
jobs="${MOED_PEER_JOBS:-2}"
py="${PYTHON:-python3}"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(llama-perplexity)

mkdir -p "$dir"
src="$dir/src"
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$dir/dl" "$src"
    mkdir -p "$dir/dl"
    "$py" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$ver" -d "$dir/dl" >&2
    tarball=$(ls "$dir"/dl/llama_cpp_python-*.tar.gz | head -1)
    mkdir -p "$src"
    tar -xzf "$tarball" -C "$src" --strip-components=1
fi

need=0
for t in "${targets[@]}"; do [ -x "$dir/build/bin/$t" ] || need=1; done
if [ $need = 1 ]; then
    # CPU only and no accelerators, no curl (nothing is downloaded at run
    # time), native ISA like moed's own build.
    cmake -S "$src/vendor/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build "$dir/build" -j "$jobs" --target "${targets[@]}" >&2
fi
echo "$dir/build/bin"
