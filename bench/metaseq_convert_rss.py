#!/usr/bin/env python3
"""Peak memory of `opt-rs convert --from metaseq` on a multi-GB checkpoint made on the fly.

    cargo build --release -p opt-rs
    .venv-ref/bin/python bench/metaseq_convert_rss.py [--preset 1.3b] [--layout fsdp] [--keep]

Writes a random-weight metaseq checkpoint of an OPT preset's shapes in float16 (1.3b: 2.6 GB)
into a temporary folder, in one of the release's layouts:

  singleton  restored.pt
  mp         reshard-model_part-{0,1}.pt, fused qkv_proj (2-way tensor parallel)
  fsdp       checkpoint_last-model_part-{0,1}-shard{0..3}.pt with shard_metadata (2 x 4)

then runs the converter on it and reports its peak resident set (its VmHWM, which it prints on
exit) and, sampled every 10 ms from /proc/<pid>/status, the peaks of the anonymous (heap) and
file-backed (memory-mapped input) parts of it. A few converted tensors are
checked against the generator. The checkpoint and the output are deleted afterwards unless
--keep. Nothing here is committed as data: the files exist only while the script runs.

The layouts come from tools/reference/generate_metaseq.py (mp_split, fsdp_shard, envelope).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "reference"))
import generate_metaseq as gm  # noqa: E402

PRESETS = {  # layers, heads, d_model (as OptConfig::preset)
    "125m": (12, 12, 768),
    "1.3b": (24, 32, 2048),
    "2.7b": (32, 32, 2560),
}
VOCAB, POSITIONS = 50272, 2048


def values(name: str, shape) -> torch.Tensor:
    """Deterministic float16 values for a metaseq tensor, regenerable for checking."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * 0.02).half()


def metaseq_state_dict(preset: str) -> "OrderedDict[str, torch.Tensor]":
    layers, _, d = PRESETS[preset]
    f = 4 * d
    shapes = OrderedDict()
    shapes["decoder.embed_tokens.weight"] = (VOCAB, d)
    shapes["decoder.embed_positions.weight"] = (POSITIONS + 2, d)
    for i in range(layers):
        p = f"decoder.layers.{i}."
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{p}self_attn.{n}.weight"] = (d, d)
            shapes[f"{p}self_attn.{n}.bias"] = (d,)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{n}.weight"] = (d,)
            shapes[f"{p}{n}.bias"] = (d,)
        shapes[f"{p}fc1.weight"], shapes[f"{p}fc1.bias"] = (f, d), (f,)
        shapes[f"{p}fc2.weight"], shapes[f"{p}fc2.bias"] = (d, f), (d,)
    shapes["decoder.layer_norm.weight"] = (d,)
    shapes["decoder.layer_norm.bias"] = (d,)
    sd = OrderedDict((k, values(k, s)) for k, s in shapes.items())
    sd["decoder.version"] = torch.tensor([3.0])
    return sd


def fuse_qkv(sd):
    for k in [k for k in sd if k.endswith("self_attn.k_proj.weight") or k.endswith("self_attn.k_proj.bias")]:
        kk, vv, qq = sd.pop(k), sd.pop(k.replace("k_proj", "v_proj")), sd.pop(k.replace("k_proj", "q_proj"))
        sd[k.replace("k_proj", "qkv_proj")] = torch.cat([kk, vv, qq])
    return sd


def write_checkpoint(preset: str, layout: str, d: Path) -> list[Path]:
    layers, heads, dm = PRESETS[preset]
    hf_cfg = SimpleNamespace(
        num_hidden_layers=layers, hidden_size=dm, ffn_dim=4 * dm, num_attention_heads=heads, do_layer_norm_before=True
    )
    sd = metaseq_state_dict(preset)
    files = []
    if layout == "singleton":
        sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
        files.append(gm.write(d / "restored.pt", gm.envelope(sd, hf_cfg, 1)))
    elif layout == "mp":
        for p, part in enumerate(gm.mp_split(fuse_qkv(sd), 2)):
            files.append(gm.write(d / f"reshard-model_part-{p}.pt", gm.envelope(part, hf_cfg, 2)))
    else:
        parts = gm.mp_split(sd, 2)
        del sd
        for p, part in enumerate(parts):
            part["decoder.output_projection.weight"] = part["decoder.embed_tokens.weight"]
            models, metas = gm.fsdp_shard(part, 4)
            for r in range(4):
                obj = gm.envelope(models[r], hf_cfg, 2, shard_metadata=metas[r])
                files.append(gm.write(d / f"checkpoint_last-model_part-{p}-shard{r}.pt", obj))
            del models, metas
    return files


def status_kb(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def run_measured(cmd: list[str]) -> dict:
    """Runs cmd, sampling /proc/<pid>/status every 10 ms.

    The exact peak is the converter's own VmHWM, which it prints on exit ("peak memory N MiB").
    getrusage(RUSAGE_CHILDREN).ru_maxrss is not used: Linux carries the forked Python's RSS
    (gigabytes here, from generating the checkpoint) over the exec into the child's maxrss.
    """
    t0 = time.time()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    peaks = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for k, v in status_kb(proc.pid).items():
            peaks[k] = max(peaks[k], v)
        time.sleep(0.01)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"convert failed ({proc.returncode}):\n{err}")
    m = re.search(r"peak memory (\d+) MiB", err)
    return dict(seconds=time.time() - t0, vmhwm_mib=int(m.group(1)) if m else None, sampled_peaks_kb=peaks, stderr=err)


def check_output(out: Path, preset: str):
    from safetensors import safe_open

    layers = PRESETS[preset][0]
    index = out / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    for name in (
        "decoder.embed_tokens.weight",
        "decoder.layers.0.self_attn.q_proj.weight",
        f"decoder.layers.{layers - 1}.fc2.weight",
        "decoder.layer_norm.bias",
    ):
        key = "model." + name.replace("decoder.layer_norm", "decoder.final_layer_norm")
        file = out / (weight_map[key] if weight_map else "model.safetensors")
        with safe_open(file, "pt") as f:
            got = f.get_tensor(key)
        assert torch.equal(got, values(name, got.shape)), name


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1.3b", choices=sorted(PRESETS))
    ap.add_argument("--layout", default="fsdp", choices=["singleton", "mp", "fsdp"])
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    binary = REPO / "target" / "release" / "opt-rs"
    if not binary.exists():
        raise SystemExit("build first: cargo build --release -p opt-rs")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="metaseq-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src, out = work / "metaseq", work / "hf"
        src.mkdir(exist_ok=True)
        t0 = time.time()
        files = write_checkpoint(a.preset, a.layout, src)
        size = sum(f.stat().st_size for f in files)
        print(f"wrote {len(files)} metaseq file(s), {size / 1e9:.2f} GB, in {time.time() - t0:.0f} s", flush=True)
        cmd = [str(binary), "convert", "--from", "metaseq", "--preset", a.preset, "--out", str(out), str(src)]
        r = run_measured(cmd)
        check_output(out, a.preset)
        written = sum(p.stat().st_size for p in out.iterdir())
        result = {
            "preset": a.preset,
            "layout": a.layout,
            "files": len(files),
            "input_bytes": size,
            "output_bytes": written,
            "seconds": round(r["seconds"], 1),
            "peak_rss_mib": r["vmhwm_mib"],
            "sampled_peak_rss_mib": round(r["sampled_peaks_kb"]["VmRSS"] / 1024, 1),
            "sampled_peak_rss_anon_mib": round(r["sampled_peaks_kb"]["RssAnon"] / 1024, 1),
            "sampled_peak_rss_file_mib": round(r["sampled_peaks_kb"]["RssFile"] / 1024, 1),
            "command": " ".join(cmd),
        }
        print(r["stderr"].strip())
        print(json.dumps(result))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
