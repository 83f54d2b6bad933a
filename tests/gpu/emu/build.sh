#!/bin/bash
# tests/gpu/emu/build.sh - builds the CUDA backend's kernels for the CPU
# emulation (cuda_emu.h) and runs check_cuda_ops / check_cuda_e2e against
# them: a way to find indexing, reduction and barrier mistakes in the
# kernels on a machine without a GPU. Slow (each CUDA thread is a thread);
# shapes are those of the real suites. Not part of `make check`.
#
#   tests/gpu/emu/build.sh [ops|e2e|all]   (default all); BUILD=build-emu
set -euo pipefail
cd "$(dirname "$0")/../../.."
B=${BUILD:-build-emu}
E=tests/gpu/emu
mkdir -p "$B/emu"
make CUDA=0 BUILD="$B" "$B/libmoed.a" >/dev/null
CXXFLAGS="-std=c++17 -O2 -g -pthread -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas -Wno-sign-compare -Wno-unused-variable -I$E/include -I$E -Iengine -Icuda -DMOE_HAVE_CUDA=1"
objs=()
for f in cuda/*.cu; do
    o="$B/emu/$(basename "$f" .cu).o"
    if [ ! -f "$o" ] || [ "$f" -nt "$o" ] || [ cuda/cuda_internal.cuh -nt "$o" ] || [ $E/cuda_emu.h -nt "$o" ]; then
        g++ $CXXFLAGS -include cuda_emu.h -x c++ -c "$f" -o "$o"
    fi
    objs+=("$o")
done
g++ $CXXFLAGS -c $E/emu.cc -o "$B/emu/emu.o"
objs+=("$B/emu/emu.o")
for t in check_cuda_ops check_cuda_e2e; do
    gcc -std=c11 -O2 -g -pthread -D_GNU_SOURCE -Iengine -Iengine/cpu -Icuda -DMOE_HAVE_CUDA=1 -DMOE_CUDA_EMU=1 \
        -DMOE_SRC_DIR="\"$PWD\"" $(pkg-config --cflags check) -o "$B/emu/$t" tests/$t.c "${objs[@]}" "$B/libmoed.a" \
        $(pkg-config --libs check) $(pkg-config --libs icu-uc powercap) -lstdc++ -lm -lpthread
done
what=${1:-all}
rc=0
export CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-10}
if [ "$what" = ops ] || [ "$what" = all ]; then "$B/emu/check_cuda_ops" || rc=1; fi
if [ "$what" = e2e ] || [ "$what" = all ]; then "$B/emu/check_cuda_e2e" || rc=1; fi
exit $rc
