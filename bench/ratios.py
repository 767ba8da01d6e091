"""Print opt-rs / PyTorch ratios from the JSON lines `bench/cpu.sh` collected."""
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
hf = {r["task"]: r for r in rows if r["sys"].startswith("hf")}
for r in rows:
    if not r["sys"].startswith("opt-rs"):
        continue
    peer = hf.get(r["task"]) or (hf.get("prefill") if r["task"] == "prefill_last" else None)
    if peer is None:
        continue
    if "ms" in r:
        print(f"{r['task']:<16} {r.get('dtype','f32'):>5}: opt-rs {r['ms']:8.1f} ms  PyTorch {peer['ms']:8.1f} ms  speed-up {peer['ms'] / r['ms']:.2f}x")
    elif "new_tok_per_s" in r:
        print(f"{r['task']:<16} {r.get('dtype','f32'):>5}: opt-rs {r['new_tok_per_s']:8.1f} tok/s  PyTorch {peer['new_tok_per_s']:8.1f} tok/s  speed-up {r['new_tok_per_s'] / peer['new_tok_per_s']:.2f}x")
