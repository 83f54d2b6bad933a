#!/usr/bin/env bash
# quality.sh - the quality report of docs/quantization.md: one base model
# quantized to each type, then perplexity, KL against the base, top-1
# agreement, file size and decode speed for each.
#
#   tests/bench/quality.sh SRC.gguf TEXT [WORKDIR]
#
# SRC is converted to F32 first (exact for F16/BF16/Q8_0/Q4_1 sources), which
# is the base every type is made from and measured against. Results go to
# WORKDIR (default /tmp/moed-quality): p-TYPE.log (perplexity), b-TYPE.log
# (moed bench), q-TYPE.log (quantize). Environment: MOED (the binary,
# default build/moed), CTX (512), CHUNKS (8), THREADS (2).
set -euo pipefail
src="$1"; text="$2"; dir="${3:-/tmp/moed-quality}"
moed="${MOED:-$(pwd)/build/moed}"
ctx="${CTX:-512}"; chunks="${CHUNKS:-8}"; threads="${THREADS:-2}"
mkdir -p "$dir"
types="F16 Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0"
"$moed" quantize "$src" "$dir/base-F32.gguf" F32 > "$dir/q-F32.log" 2>&1
for t in $types; do "$moed" quantize "$dir/base-F32.gguf" "$dir/m-$t.gguf" "$t" > "$dir/q-$t.log" 2>&1; done
ppl=("$moed" perplexity -f "$text" --ctx "$ctx" --chunks "$chunks" --threads "$threads")
"${ppl[@]}" -m "$dir/base-F32.gguf" --save-logits "$dir/base.kl" > "$dir/p-F32.log" 2>&1
for t in $types; do "${ppl[@]}" -m "$dir/m-$t.gguf" --kl-base "$dir/base.kl" > "$dir/p-$t.log" 2>&1; done
"$moed" bench -m "$dir/base-F32.gguf" --threads "$threads" --prompt 64 --gen 32 --batch 1 --bw-mib 256 \
    > "$dir/b-F32.log" 2>&1
for t in $types; do
    "$moed" bench -m "$dir/m-$t.gguf" --threads "$threads" --prompt 64 --gen 32 --batch 1 --bw-mib 256 \
        > "$dir/b-$t.log" 2>&1
done
for t in F32 $types; do
    f="$dir/m-$t.gguf"; [ "$t" = F32 ] && f="$dir/base-F32.gguf"
    printf '%-7s %10d bytes  %s  %s\n' "$t" "$(stat -c %s "$f")" "$(grep '^PPL' "$dir/p-$t.log")" \
        "$(grep -h 'KL divergence\|top-1' "$dir/p-$t.log" | tr '\n' ' ')"
done
