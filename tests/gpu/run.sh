#!/bin/bash
# tests/gpu/run.sh - the whole GPU check in one command, for the GPU machine
# (no network): build with CUDA, run the CUDA Check suites, the kernels'
# resource usage, `moed bench --device cuda`, and a short
# table last. Generates its models on the spot (check_cuda_e2e uses
# mkmodel); meant to finish in under 5 minutes on an H200.
#
#   tests/gpu/run.sh            # from anywhere; logs go to $OUT (or /tmp/moed-gpu)
#
# Build dependencies: when deploy/install-deps.sh finds -dev packages
# missing and cannot install them (no network), the .deb files that
# tests/gpu/fetch-debs.sh downloaded beforehand into .debs/ (carried with
# the call) are unpacked into a private prefix. Nothing outside /tmp and
# the build folder is written.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/moed-gpu}
mkdir -p "$OUT"
B=${BUILD:-build}
J=$(nproc)
T0=$SECONDS
ROWS=()
row() { ROWS+=("$(printf '%-26s %-6s %5ss  %s' "$1" "$2" "$3" "$4")"); }

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/device.txt"
nvcc --version | tail -2

# ---- build dependencies ----
echo "== dependencies"
t=$SECONDS
dep_note="system"
if ! ./deploy/install-deps.sh >"$OUT/deps.log" 2>&1; then
    if ls .debs/*.deb >/dev/null 2>&1; then
        P=/tmp/moed-deps
        rm -rf "$P" && mkdir -p "$P"
        for f in .debs/*.deb; do dpkg -x "$f" "$P"; done
        LIB=$P/usr/lib/x86_64-linux-gnu
        PC=$LIB/pkgconfig
        # libmicrohttpd.pc names gnutls privately; its headers are not needed
        [ -f "$PC/gnutls.pc" ] ||
            printf 'Name: gnutls\nDescription: stub\nVersion: 3.7.0\nLibs:\nCflags:\n' >"$PC/gnutls.pc"
        if ! command -v pkg-config >/dev/null 2>&1; then
            mkdir -p "$P/bin"
            printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$LIB" "$P/usr/bin/pkgconf" >"$P/bin/pkg-config"
            chmod +x "$P/bin/pkg-config"
            export PATH=$P/bin:$PATH
        fi
        # only the unpacked .pc files, their paths moved under $P
        export PKG_CONFIG_SYSROOT_DIR=$P PKG_CONFIG_LIBDIR=$PC:$P/usr/share/pkgconfig
        export CPATH=$P/usr/include${CPATH:+:$CPATH}
        export LIBRARY_PATH=$LIB${LIBRARY_PATH:+:$LIBRARY_PATH}
        export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        dep_note="from .debs"
        ./deploy/install-deps.sh >>"$OUT/deps.log" 2>&1 || dep_note="MISSING (see deps.log)"
    else
        dep_note="MISSING: run tests/gpu/fetch-debs.sh here and carry .debs"
    fi
fi
echo "$dep_note"
row "dependencies" "$([ "${dep_note:0:7}" = MISSING ] && echo FAIL || echo ok)" $((SECONDS - t)) "$dep_note"

# ---- build ----
echo "== build (make CUDA=1 BUILD=$B -j$J)"
t=$SECONDS
make CUDA=1 BUILD="$B" -j"$J" "$B/tests/check_cuda_ops" "$B/tests/check_cuda_e2e" >"$OUT/build.log" 2>&1
brc=$?
tail -3 "$OUT/build.log"
row "build CUDA tests" "$([ $brc = 0 ] && echo ok || echo FAIL)" $((SECONDS - t)) "log: build.log"
t=$SECONDS
make CUDA=1 BUILD="$B" -j"$J" all >>"$OUT/build.log" 2>&1
mrc=$?
row "build moed" "$([ $mrc = 0 ] && echo ok || echo FAIL)" $((SECONDS - t)) ""

# ---- resource usage of every kernel (registers, stack = spills) ----
if command -v cuobjdump >/dev/null 2>&1 && ls "$B"/cuda/*.o >/dev/null 2>&1; then
    for o in "$B"/cuda/*.o; do cuobjdump --dump-resource-usage "$o"; done >"$OUT/resources.txt" 2>&1
    n_k=$(grep -c 'REG:' "$OUT/resources.txt")
    n_stack=$(grep 'REG:' "$OUT/resources.txt" | grep -vc 'STACK:0 ')
    maxreg=$(grep -o 'REG:[0-9]*' "$OUT/resources.txt" | cut -d: -f2 | sort -n | tail -1)
    row "kernel resources" "info" 0 "$n_k kernels (both archs), max $maxreg regs, $n_stack with a stack frame"
fi

# ---- Check suites ----
suite() { # name binary timeout
    local name=$1 bin=$2 lim=$3 t=$SECONDS rc sum
    echo "== $name"
    if [ ! -x "$bin" ]; then
        row "$name" "FAIL" 0 "not built"
        return
    fi
    CK_DEFAULT_TIMEOUT=$lim timeout "$lim" "$bin" >"$OUT/$name.log" 2>&1
    rc=$?
    grep -E '^[0-9]+%|SKIP|FAIL|F:|E:' "$OUT/$name.log" | grep -v '^seed' | head -20
    sum=$(grep -E '^[0-9]+%: Checks' "$OUT/$name.log" | tail -1)
    [ -z "$sum" ] && sum=$(grep -m1 -E '^(SKIP|FAIL)' "$OUT/$name.log")
    row "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - t)) "${sum:-rc $rc}"
}
suite check_cuda_ops "$B/tests/check_cuda_ops" 90
suite check_cuda_e2e "$B/tests/check_cuda_e2e" 90

# ---- kernel timings (tests/tool_cuda_bench.c) ----
echo "== tool_cuda_bench"
t=$SECONDS
if make CUDA=1 BUILD="$B" -j"$J" "$B/tests/tool_cuda_bench" >>"$OUT/build.log" 2>&1; then
    timeout 45 "$B/tests/tool_cuda_bench" 2>&1 | tee "$OUT/kernels.txt"
    row "tool_cuda_bench" "$([ "${PIPESTATUS[0]}" = 0 ] && echo ok || echo FAIL)" $((SECONDS - t)) "table: kernels.txt"
else
    row "tool_cuda_bench" "FAIL" $((SECONDS - t)) "not built"
fi

# ---- moed bench on the GPU: a V2-Lite-shaped model (4 layers, Q8_0) made here ----
echo "== moed bench --device cuda"
t=$SECONDS
if [ -x "$B/moed" ]; then
    M=/tmp/moed-gpu-v2lite4-q8.gguf
    [ -f "$M" ] || "$B/moed" mkmodel --arch deepseek2 --preset v2-lite --layers 4 --type Q8_0 -o "$M" >"$OUT/bench.log" 2>&1
    timeout 90 "$B/moed" bench -m "$M" --device cuda --prompt 128 --gen 16 --batch 1,8,32 >>"$OUT/bench.log" 2>&1
    rc=$?
    tail -15 "$OUT/bench.log"
    row "moed bench --device cuda" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - t)) "log: bench.log"
    # energy: with the driver present, auto must pick the GPU's NVML counter (docs/cost.md)
    eline=$(grep -m1 '^energy (' "$OUT/bench.log")
    row "energy source nvml" "$(echo "$eline" | grep -q '^energy (nvml' && echo ok || echo FAIL)" 0 "${eline:0:120}"
    rm -f "$M"
else
    row "moed bench --device cuda" "FAIL" 0 "moed not built"
fi

echo
echo "== summary ($((SECONDS - T0)) s; logs in $OUT)"
printf '%-26s %-6s %6s  %s\n' "step" "status" "time" "note"
for r in "${ROWS[@]}"; do echo "$r"; done
