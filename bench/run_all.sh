#!/usr/bin/env bash
# The benchmark and frontier runs behind bench/results/ (minutes each on 2 cores; run on a quiet machine).
# Usage: bash bench/run_all.sh [bench|frontier|convert|grid|all]   (from the repository root, venv active)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results
TEXT=tests/fixtures/alice29.txt
mkdir -p "$OUT"

run_mmt() { mmt "$@"; }

what=${1:-all}
if [[ $what == bench || $what == all ]]; then
  for m in smollm2-135m-instruct gemma3-270m; do
    run_mmt bench -m "$m" -p 256 -g 64 -r 3 --json "$OUT/bench-$m.json" --plot "$OUT/bench-$m.png" \
      | tee "$OUT/bench-$m.txt"
  done
fi
if [[ $what == frontier || $what == all ]]; then
  for m in smollm2-135m-instruct gemma3-270m; do
    run_mmt eval frontier -m "$m" --text "$TEXT" --start "Alice was beginning" --ctx 512 --chunks 8 \
      --presets "${PRESETS:-high,default,small,smallest,tiny}" --bits 2,3,4,8 --out "$OUT/frontier-$m.png" --json \
      > "$OUT/frontier-$m.json"
  done
  for m in smollm2-135m-instruct gemma3-270m; do
    run_mmt eval kl -m "$m" --text "$TEXT" --start "Alice was beginning" --ctx 512 --chunks 4 --json \
      > "$OUT/kl-$m.json"
  done
fi
if [[ $what == convert || $what == all ]]; then
  # conversion time at the default preset (the report's "seconds"; budget: 3 min SmolLM2, 6 min Gemma on 2 cores)
  for m in smollm2-135m-instruct gemma3-270m; do
    tmp=$(mktemp -d)
    run_mmt convert "$m" -o "$tmp/fgs" --preset default --json > "$OUT/convert-$m.json"
    rm -rf "$tmp"
  done
fi
if [[ $what == grid || $what == all ]]; then
  # the rounding grid of a uniform 3-bit g64 quantization against perplexity (README: "Below 4 bits")
  python bench/quant_grid.py -m smollm2-135m-instruct --bits 3 --group 64 --json > "$OUT/quant-grid-smollm2-135m-instruct.json"
fi
