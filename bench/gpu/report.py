"""The issue's table from bench/gpu/run.sh's results.jsonl: opt-rs and PyTorch from the same
call, their ratio, and what bounds each opt-rs figure (achieved bandwidth against the measured
copy ceiling for decoding, achieved TFLOP/s against the measured bf16 matmul rate for training).
Also the step statuses, the kernel/model test summaries and the CPU/CUDA loss curves.

    python3 bench/gpu/report.py OUT/results.jsonl OUT"""
import json
import os
import sys

res, out = sys.argv[1], sys.argv[2]
rows = []
for line in open(res):
    line = line.strip()
    if line.startswith("{"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass

SIZES = {"125m": (12, 12, 768, 125.2e6), "1.3b": (24, 32, 2048, 1315.8e6)}


def find(pred):
    for r in rows:
        try:
            if pred(r):
                return r
        except (KeyError, TypeError):
            pass
    return None


def is_gen(r, sys_prefix, model, batch):
    return (r.get("sys", "").startswith(sys_prefix) and str(r.get("task", "")).startswith("generate")
            and r.get("model") == model and int(r.get("batch", 1)) == batch)


def is_train(r, sys_prefix, model, recompute=False):
    return (r.get("sys", "").startswith(sys_prefix) and r.get("task") == "train" and r.get("model") == model
            and not r.get("compile", False) and bool(r.get("recompute", False)) == recompute)


copy = find(lambda r: r["task"] == "ceiling_copy")
mm = find(lambda r: r["task"] == "ceiling_matmul_bf16")
copy_gbs = copy["gb_per_s"] if copy else None
mm_tf = mm["tflops"] if mm else None

print("\n== steps")
for r in rows:
    if "status" in r:
        print(f"  {r['task']:<24} {r['status']:<10} {r['s']:>4} s")

for name in ("kernels", "model"):
    path = os.path.join(out, name + ".log")
    if os.path.exists(path):
        lines = [l.rstrip() for l in open(path) if l.startswith("test result") or "FAILED" in l or "panicked" in l]
        print(f"\n== {name} tests")
        for l in lines[-8:]:
            print("  " + l)

print(f"\n== ceilings (this call): copy {copy_gbs} GB/s, bf16 matmul {mm_tf} TFLOP/s")
print("\n== the issue's table (opt-rs / PyTorch eager, same call)")
print(f"  {'work':<34} {'PyTorch':>10} {'opt-rs':>10} {'ratio':>7}  {'target':>8}  bound")
table = [
    ("train OPT-125m x2048 tok/s", "train", "125m", None, 350e3),
    ("train OPT-1.3b x2048 tok/s", "train", "1.3b", None, 55e3),
    ("  the same, recomputing activations", "train_rc", "1.3b", None, 55e3),
    ("decode OPT-125m b1 tok/s", "gen", "125m", 1, 1500),
    ("decode OPT-1.3b b1 tok/s", "gen", "1.3b", 1, 700),
    ("generate OPT-125m b32 new tok/s", "gen", "125m", 32, 20e3),
]
for label, kind, model, batch, target in table:
    if kind in ("train", "train_rc"):
        o = find(lambda r: is_train(r, "opt-rs", model, kind == "train_rc"))
        h = find(lambda r: is_train(r, "hf", model))
        key = "tok_per_s"
        kind = "train"
    else:
        o = find(lambda r: is_gen(r, "opt-rs", model, batch))
        h = find(lambda r: is_gen(r, "hf", model, batch))
        key = "new_tok_per_s"
    ov = o.get(key) if o else None
    hv = h.get(key) if h else None
    ratio = f"{ov / hv:.2f}x" if ov and hv else "-"
    bound = f"[batch {h.get('batch') if h else '-'}/{o.get('batch') if o else '-'}] " if kind == "train" else ""
    L, H, D, N = SIZES[model]
    if ov and kind == "train":
        flops_tok = 6 * N + 12 * L * D * 2048
        tf = flops_tok * ov / 1e12
        bound += f"{tf:.0f} TFLOP/s" + (f" = {tf / mm_tf:.0%} of matmul" if mm_tf else "")
    elif ov and kind == "gen":
        # each decode step reads every bf16 weight once (batch shares the read)
        gbs = 2 * N * ov / batch / 1e9
        bound = f"{gbs:.0f} GB/s weights" + (f" = {gbs / copy_gbs:.0%} of copy" if copy_gbs else "")
    fmt = lambda v: f"{v:>10.0f}" if v else f"{'-':>10}"
    print(f"  {label:<34} {fmt(hv)} {fmt(ov)} {ratio:>7}  {target:>8.0f}  {bound}")

for prec, prefix in (("f32", "train-"), ("bf16", "train-bf16-")):
    print(f"\n== loss curves, 20 steps, {prec} (CPU vs CUDA)")
    curves = {}
    for dev in ("cpu", "cuda"):
        path = os.path.join(out, f"{prefix}{dev}", "logbook.jsonl")
        if os.path.exists(path):
            curves[dev] = {r["step"]: r["loss"] for r in map(json.loads, open(path)) if r.get("kind") == "train"}
    if len(curves) == 2 and curves["cpu"]:
        steps = sorted(set(curves["cpu"]) & set(curves["cuda"]))
        worst = max((abs(curves["cpu"][s] - curves["cuda"][s]) / abs(curves["cpu"][s]) for s in steps), default=None)
        for s in steps[:: max(1, len(steps) // 5)]:
            print(f"  step {s:>3}: cpu {curves['cpu'][s]:.6f}  cuda {curves['cuda'][s]:.6f}")
        print(f"  max relative difference over {len(steps)} steps: {worst:.2e}" if worst is not None else "  no common steps")
    else:
        print(f"  (missing: see the {prefix}* logs)")
