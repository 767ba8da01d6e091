#!/usr/bin/env bash
# Training-step benchmark on the CPU: opt-rs's trainer against HF transformers + torch AdamW on
# OPT-125m shapes (batch 4 × 128, f32, dropout 0, no clipping, random weights), same machine,
# same run. Prints one JSON line per system and the ratios.
#
#   bench/train.sh [PYTHON]          (STEPS=4 by default: 1 warm-up + 3 timed, as the anchor)
#
# opt-rs: `opt-rs train` itself (real data pipeline, AdamW, logbook); step time = mean over the
# timed steps of the logbook's per-step compute time; memory = the logbook's peak RSS at the
# last step (training only) and the whole process's (which includes the final checkpoint).
# PyTorch: shared/anchors/hf_cpu_baseline.py (or bench/hf_cpu.py) `125m train`; memory = the
# whole process's peak RSS. Needs /usr/bin/time and torch 2.11 + transformers 5.17 in PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv-ref/bin/python}
steps=${STEPS:-4}
cargo build --release -q -p opt-rs
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

/usr/bin/time -v ./target/release/opt-rs train --fresh \
  --set run.dir="$tmp/run" --set model.preset=125m --set model.dropout=0 --set train.batch_size=4 \
  --set data.seq_len=128 --set train.max_steps="$steps" --set schedule.kind=constant \
  --set schedule.warmup_steps=0 --set optim.lr=1e-4 --set optim.clip_norm=0 --set guards.enabled=false \
  --set run.log_every=1 --set run.eval_batches=0 --set 'data.valid=""' --set 'sample.prompts=[]' \
  >"$tmp/opt-rs.out" 2>"$tmp/opt-rs.err"
python3 - "$tmp" <<'PY' | tee "$tmp/rows.jsonl"
import json, re, sys
tmp = sys.argv[1]
rows = [json.loads(l) for l in open(f"{tmp}/run/logbook.jsonl")]
train = [r for r in rows if r.get("kind") == "train"]
timed = train[1:] or train
step_s = sum(512 / r["tokens_per_s"] for r in timed) / len(timed)
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{tmp}/opt-rs.err").read())
print(json.dumps(dict(sys="opt-rs-cpu", task="train4x128", model="125m", step_s=round(step_s, 2),
                      tok_per_s=round(512 / step_s, 1), mfu=timed[-1]["mfu"], peak_rss_mb_train=train[-1].get("peak_rss_mb"),
                      peak_rss_mb_process=round(int(rss.group(1)) / 1024) if rss else None)))
PY

anchor=../shared/anchors/hf_cpu_baseline.py
[ -f "$anchor" ] || anchor=/work/shared/anchors/hf_cpu_baseline.py
[ -f "$anchor" ] || anchor=bench/hf_cpu.py
if "$py" -c "import torch, transformers" 2>/dev/null; then
  /usr/bin/time -v "$py" "$anchor" 125m train >"$tmp/hf.out" 2>"$tmp/hf.err"
  python3 - "$tmp" <<'PY' | tee -a "$tmp/rows.jsonl"
import json, re, sys
tmp = sys.argv[1]
row = [json.loads(l) for l in open(f"{tmp}/hf.out") if l.startswith("{")][-1]
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{tmp}/hf.err").read())
row["peak_rss_mb_process"] = round(int(rss.group(1)) / 1024) if rss else None
print(json.dumps(row))
PY
  python3 - "$tmp/rows.jsonl" <<'PY'
import json, sys
rows = {r["sys"]: r for r in map(json.loads, open(sys.argv[1]))}
o, h = rows["opt-rs-cpu"], rows["hf-torch-cpu"]
print(f"train 4x128 125m f32: opt-rs {o['step_s']:.2f} s/step ({o['tok_per_s']} tok/s), PyTorch {h['step_s']:.2f} s/step "
      f"({h['tok_per_s']} tok/s): opt-rs takes {o['step_s'] / h['step_s']:.2f}x PyTorch's time")
print(f"peak RSS: opt-rs {o['peak_rss_mb_train']} MB training ({o['peak_rss_mb_process']} MB with the final checkpoint), "
      f"PyTorch {h['peak_rss_mb_process']} MB")
PY
else
  echo "(no torch at $py: PyTorch not measured)"
fi
