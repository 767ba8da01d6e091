#!/usr/bin/env python3
"""Check that a folder written by opt-rs loads in HF transformers and reproduces a fixture's logits.

    .venv-ref/bin/python tools/reference/check_roundtrip.py <folder> <fixture-name> [--tol 1e-4]

<folder> must hold config.json plus model.safetensors (or a sharded safetensors set with
model.safetensors.index.json, or pytorch_model.bin) -- whatever OPTForCausalLM.from_pretrained
accepts.  <fixture-name> is one of fixtures/<name>/ that has a reference.safetensors
(pre_ln, post_ln_proj, galactica, no_final_ln).

The model is loaded in float32 with eager attention and run on the fixture's input_ids /
attention_mask.  Its logits are compared at every position with the fixture's `logits`
(or with `logits_bf16w` when the folder's weights are stored in bfloat16, or with --against).
Missing or unexpected weight keys are a failure too.  Exit code 0 = PASS, 1 = FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import OPTForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def stored_dtypes(folder: Path) -> set[str]:
    dtypes: set[str] = set()
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                dtypes.add(str(h.get_slice(k).get_dtype()).upper())
    return dtypes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("fixture", help="fixture name, e.g. pre_ln, or a path to a fixture folder")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |logit difference| allowed (default 1e-4)")
    ap.add_argument(
        "--against",
        choices=["auto", "logits", "logits_bf16w"],
        default="auto",
        help="which fixture tensor to compare with (auto: logits_bf16w if weights are stored as bf16)",
    )
    args = ap.parse_args()

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)

    fx = Path(args.fixture)
    if not fx.is_dir():
        fx = REPO / "fixtures" / args.fixture
    ref_path = fx / "reference.safetensors"
    if not ref_path.exists():
        print(f"FAIL: no reference.safetensors in {fx}")
        return 1
    ref = load_file(str(ref_path))

    folder = args.folder
    if not (folder / "config.json").exists():
        print(f"FAIL: {folder}/config.json missing")
        return 1

    problems: list[str] = []
    try:
        model, info = OPTForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    except Exception as e:  # noqa: BLE001
        print(f"FAIL: from_pretrained raised {type(e).__name__}: {e}")
        return 1
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            problems.append(f"{kind}: {sorted(map(str, info[kind]))}")
    model.eval()

    against = args.against
    dts = stored_dtypes(folder)
    if against == "auto":
        against = "logits_bf16w" if dts == {"BF16"} else "logits"

    # Compare the config fields that change the architecture.
    fx_cfg = json.loads((fx / "config.json").read_text())
    cfg = model.config
    for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
        "max_position_embeddings", "word_embed_proj_dim", "do_layer_norm_before", "_remove_final_layer_norm",
        "enable_bias", "layer_norm_elementwise_affine", "activation_function", "tie_word_embeddings",
        "pad_token_id",
    ):
        if k in fx_cfg and getattr(cfg, k, None) != fx_cfg[k]:
            problems.append(f"config.{k} = {getattr(cfg, k, None)!r}, fixture has {fx_cfg[k]!r}")

    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits.float()
    expect = ref[against]
    if logits.shape != expect.shape:
        problems.append(f"logits shape {tuple(logits.shape)} != fixture {tuple(expect.shape)}")
        maxdiff = float("inf")
    else:
        diff = (logits - expect).abs()
        maxdiff = float(diff.max())
        real = ref["attention_mask"].bool()
        maxdiff_real = float(diff[real].max())
        if not maxdiff <= args.tol:  # also catches NaN
            problems.append(
                f"max |Δlogits| = {maxdiff:.3e} > tol {args.tol:g} (over mask==1 positions only: {maxdiff_real:.3e})"
            )

    print(f"folder:   {folder}")
    print(f"fixture:  {fx} (compared with `{against}`)")
    print(f"stored weight dtypes: {sorted(dts) if dts else 'n/a (not safetensors)'}")
    print(f"max |Δlogits| = {maxdiff:.3e} (tol {args.tol:g})")
    if problems:
        for p in problems:
            print(f"  - {p}")
        print("FAIL")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
