#!/usr/bin/env bash
# CPU benchmark: opt-rs against HF transformers (PyTorch) on the same shapes, same machine,
# same run. Prints both JSON lines and the ratios.
#
#   bench/cpu.sh [PRESET] [PYTHON]
#
# PYTHON must have torch 2.11.0 + transformers 5.17.0 (e.g. .venv-ref/bin/python, made by
# tools/reference/README.md's install commands). Without it only opt-rs is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-125m}
py=${2:-.venv-ref/bin/python}
cargo build --release -q -p opt-rs
out=$(mktemp)
echo "== opt-rs ($preset, f32) =="
./target/release/opt-rs bench --preset "$preset" --what prefill,decode | tee -a "$out"
echo "== opt-rs ($preset, bf16 weights) =="
./target/release/opt-rs bench --preset "$preset" --dtype bf16 --what decode | tee -a "$out"
anchor=../shared/anchors/hf_cpu_baseline.py
[ -f "$anchor" ] || anchor=bench/hf_cpu.py
if "$py" -c "import torch, transformers" 2>/dev/null; then
  echo "== HF transformers ($preset, f32) =="
  "$py" "$anchor" "$preset" prefill decode | tee -a "$out"
else
  echo "(no torch at $py: PyTorch not measured)"
fi
python3 bench/ratios.py "$out"
