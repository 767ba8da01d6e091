#!/usr/bin/env bash
# Decode benchmark: `opt-rs generate` against HF transformers `generate()` on the same shapes,
# same machine, same run — greedy, prompt 128, 128 new tokens (EOS suppressed), random weights
# of a preset, batch 1 and batch 16. Prints tokens/s (new tokens over the whole generate call,
# prefill included, as HF is timed) and the ratios.
#
#   bench/generate.sh [PRESET] [PYTHON] [DTYPES]
#
# PYTHON must have torch + transformers (e.g. .venv-ref/bin/python); without it only opt-rs is
# measured. DTYPES: weight dtypes for opt-rs (default "f32 bf16").
#
# On a busy machine run with OMP_WAIT_POLICY=PASSIVE exported: PyTorch's OpenMP threads spin
# at barriers, and with more runnable processes than cores that collapses its speed (HF decode
# of 125m, batch 1, 16+64 tokens measured 1.7 tok/s with the default policy vs 14.6 with PASSIVE
# under the same load). opt-rs (rayon) is not affected by the variable.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-125m}
py=${2:-.venv-ref/bin/python}
dtypes=${3:-f32 bf16}
prompt=128
new=128
cargo build --release -q -p opt-rs
bin=./target/release/opt-rs
out=$(mktemp)

# Deterministic prompt ids in [4, 50000): one line of 128 ids per prompt.
ids_line() { python3 -c "import sys; s=int(sys.argv[1]); print(','.join(str(4 + (s * 7919 + i * 104729) % 49996) for i in range($prompt)))" "$1"; }

for dtype in $dtypes; do
  for batch in 1 16; do
    args=()
    for ((i = 0; i < batch; i++)); do args+=(--ids "$(ids_line "$i")"); done
    echo "== opt-rs generate ($preset, $dtype weights, batch $batch) =="
    "$bin" generate --random-preset "$preset" --dtype "$dtype" "${args[@]}" --greedy \
      --max-new-tokens $new --min-new-tokens $new --json --timing 2>&1 >/dev/null \
      | grep '^{' | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r.update(task='generate b$batch $prompt+$new', batch=$batch); print(json.dumps(r))" \
      | tee -a "$out"
  done
done
if "$py" -c "import torch, transformers" 2>/dev/null; then
  echo "== HF transformers generate ($preset, f32) =="
  "$py" bench/hf_generate.py "$preset" $prompt $new 1 16 | tee -a "$out"
else
  echo "(no torch at $py: PyTorch not measured)"
fi
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
hf = {r["batch"]: r for r in rows if r["sys"].startswith("hf")}
for r in rows:
    if r["sys"].startswith("opt-rs"):
        peer = hf.get(r["batch"])
        ratio = f"  speed-up {r['new_tok_per_s'] / peer['new_tok_per_s']:.2f}x (PyTorch {peer['new_tok_per_s']:.1f} tok/s)" if peer else ""
        print(f"batch {r['batch']:>2} {r['dtype']:>5}: opt-rs {r['new_tok_per_s']:7.1f} new tok/s "
              f"(decode only {r['decode_tok_per_s']:.1f}, first token {r['first_token_s']:.2f} s){ratio}")
PY
