#!/usr/bin/env bash
# Int8 weight-only decode benchmark: batch-1 greedy decode (16-token prompt + 64 new tokens) on
# random weights of PRESET with f32, bf16 and int8 weights, every configuration once per round,
# ROUNDS rounds interleaved so that load from other processes spreads over all of them. One
# JSON line per run (the `bench` line plus "round"); a summary table at the end: tok/s of each
# round, their median, and the fastest single decode step seen (least disturbed by other load).
#
#   bench/quant.sh [PRESET] [ROUNDS] [THREADS] [OPT_RS]
#
# OPT_RS defaults to ./target/release/opt-rs (built here); give a path to use another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-125m}
rounds=${2:-3}
threads=${3:-$(nproc)}
bin=${4:-}
if [ -z "$bin" ]; then
  cargo build --release -q -p opt-rs
  bin=./target/release/opt-rs
fi
configs=(
  "--dtype f32"
  "--dtype bf16"
  "--dtype f32 --int8"
  "--dtype bf16 --int8"
  "--dtype bf16 --int8 --group-size 128"
  "--dtype bf16 --int8 --embeddings int8"
)
out=$(mktemp)
for r in $(seq 1 "$rounds"); do
  for c in "${configs[@]}"; do
    # shellcheck disable=SC2086 # the configuration is a list of words
    "$bin" --threads "$threads" bench --preset "$preset" --what decode $c \
      | sed "s/^{/{\"round\":$r,/" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, sys, collections
runs = collections.defaultdict(list)
best = collections.defaultdict(list)
mb = {}
for line in open(sys.argv[1]):
    j = json.loads(line)
    runs[j["dtype"]].append(j["new_tok_per_s"])
    best[j["dtype"]].append(j.get("min_step_ms", float("nan")))
    mb[j["dtype"]] = j["weight_mb"]
med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
fast = {k: min(v) for k, v in best.items()}
print(f"{'weights':<20}{'MB':>7}  {'tok/s per round':<36}{'median':>7}{'vs f32':>7}{'min step ms':>12}{'vs f32':>7}")
for k, v in runs.items():
    r1 = f"{med[k] / med['f32']:.2f}x" if "f32" in med else "-"
    r2 = f"{fast['f32'] / fast[k]:.2f}x" if "f32" in fast else "-"
    print(f"{k:<20}{mb[k]:>7.1f}  {', '.join(f'{x:.1f}' for x in v):<36}{med[k]:>7.1f}{r1:>7}{fast[k]:>12.2f}{r2:>7}")
PY
