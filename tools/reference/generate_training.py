#!/usr/bin/env python3
"""PyTorch ground truth for opt-rs training (crates/opt-train/tests): schedules, clipping,
weight-decay groups and batch/accumulation equivalence, on the `pre_ln` fixture model.

Run from the repository root after tools/reference/generate.py has written fixtures/pre_ln:

    .venv-ref/bin/python tools/reference/generate_training.py

Writes fixtures/training/reference.safetensors and fixtures/training/reference.json (see
fixtures/training/README.md). Deterministic: fixed seeds, one CPU thread, float32, eager
attention, dropout off (eval mode).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import OPTForCausalLM, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PRE_LN = REPO / "fixtures" / "pre_ln"
OUT = REPO / "fixtures" / "training"

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1
# Schedule trajectories: metaseq's linear polynomial decay and a cosine, both with warmup.
SCHED = dict(peak=1e-2, end=1e-3, warmup=2, total=6, steps=6, clip=1.0)
# LR tables compared against transformers' schedules (which decay to 0).
TABLE = dict(peak=1e-3, warmup=3, total=10)
ACCUM_ROWS, ACCUM_STEPS, ACCUM_LR = 4, 3, 1e-3
WD_GROUPS_STEPS, WD_GROUPS_LR = 3, 1e-3
ACCUM_SEED = 4242


def log(*a):
    print(*a, flush=True)


def metaseq_polynomial_decay(s: int, peak: float, end: float, warmup: int, total: int, power: float = 1.0) -> float:
    """metaseq.optim.lr_scheduler.PolynomialDecayLRSchedule.step_update(num_updates=s)."""
    if warmup > 0 and s <= warmup:
        return peak * s / float(warmup)
    if s >= total:
        return end
    pct_remaining = 1 - (s - warmup) / (total - warmup)
    return (peak - end) * pct_remaining**power + end


def load_model() -> OPTForCausalLM:
    m = OPTForCausalLM.from_pretrained(PRE_LN, dtype=torch.float32, attn_implementation="eager")
    m.eval()  # dropout off
    return m


def train(model, ids, steps, lr, scheduler_fn=None, clip=0.0, groups=None):
    """AdamW on `labels = ids`; returns (losses, lrs used, grad norms, params after)."""
    m = copy.deepcopy(model)
    params = groups(m) if groups else m.parameters()
    opt = torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WD)
    sched = scheduler_fn(opt) if scheduler_fn else None
    losses, lrs, norms = [], [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        if clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(m.parameters()), clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched:
            sched.step()
    after = {n: p.detach().clone().float().contiguous() for n, p in m.named_parameters()}
    return losses, lrs, norms, after


def cosine_torch(opt):
    """Linear warmup (LambdaLR), then torch's CosineAnnealingLR down to end_lr."""
    w, t = SCHED["warmup"], SCHED["total"]
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / w)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t - w, eta_min=SCHED["end"])
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[w])


def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.set_verbosity_error()
    OUT.mkdir(exist_ok=True)
    model = load_model()
    base = load_file(str(PRE_LN / "reference.safetensors"))
    train_ids = base["train_ids"]
    ref: dict[str, torch.Tensor] = {}
    summary: dict = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}

    # 1. LR tables: transformers' linear and cosine schedules with warmup (decay to 0).
    p = torch.nn.Parameter(torch.zeros(1))
    for name, fn in [("hf_linear", get_linear_schedule_with_warmup), ("hf_cosine", get_cosine_schedule_with_warmup)]:
        opt = torch.optim.SGD([p], lr=TABLE["peak"])
        sch = fn(opt, TABLE["warmup"], TABLE["total"])
        lrs = []
        for _ in range(TABLE["total"] + 1):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        ref[f"{name}_lrs"] = torch.tensor(lrs, dtype=torch.float64).float()
        summary[f"{name}_lrs"] = lrs

    # 2. Trajectories with warmup + decay + clipping.
    peak = SCHED["peak"]
    poly = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: metaseq_polynomial_decay(s, peak, SCHED["end"], SCHED["warmup"], SCHED["total"]) / peak
    )
    for name, fn in [("sched_linear", poly), ("sched_cosine", cosine_torch)]:
        losses, lrs, norms, after = train(model, train_ids, SCHED["steps"], peak, fn, clip=SCHED["clip"])
        ref[f"{name}_losses"] = torch.tensor(losses)
        ref[f"{name}_lrs"] = torch.tensor(lrs, dtype=torch.float64).float()
        ref[f"{name}_grad_norms"] = torch.tensor(norms)
        if name == "sched_linear":
            ref.update({f"{name}_after.{n}": t for n, t in after.items()})
        summary[name] = dict(losses=losses, lrs=lrs, grad_norms=norms)
        log(f"{name}: lrs {lrs}\n  losses {losses}")
    # The cosine run must follow the closed form used by opt-rs.
    w, t, end = SCHED["warmup"], SCHED["total"], SCHED["end"]
    for s, lr in enumerate(summary["sched_cosine"]["lrs"]):
        want = peak * s / w if s <= w else end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (s - w) / (t - w)))
        assert abs(lr - want) < 1e-12, (s, lr, want)

    # 3. One batch of 4 rows (the reference for gradient accumulation of 4 × 1 or 2 × 2).
    g = torch.Generator().manual_seed(ACCUM_SEED)
    accum_ids = torch.randint(3, 512, (ACCUM_ROWS, train_ids.shape[1]), generator=g, dtype=torch.int64)
    losses, _, _, _ = train(model, accum_ids, ACCUM_STEPS, ACCUM_LR)
    ref["accum_ids"] = accum_ids
    ref["accum_losses"] = torch.tensor(losses)
    summary["accum"] = dict(ids=accum_ids.tolist(), losses=losses, lr=ACCUM_LR)
    log(f"accum losses {losses}")

    # 4. Weight decay on matrices only (biases and LayerNorms in a wd = 0 group).
    def groups(m):
        decay = [p for p in m.parameters() if p.dim() == 2]
        rest = [p for p in m.parameters() if p.dim() != 2]
        return [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]

    losses, _, _, after = train(model, train_ids, WD_GROUPS_STEPS, WD_GROUPS_LR, groups=groups)
    ref["wd_matrices_losses"] = torch.tensor(losses)
    ref.update({f"wd_matrices_after.{n}": t for n, t in after.items()})
    summary["wd_matrices"] = dict(losses=losses, lr=WD_GROUPS_LR)
    log(f"wd matrices losses {losses}")

    summary["settings"] = dict(betas=list(BETAS), eps=EPS, weight_decay=WD, sched=SCHED, table=TABLE)
    ref = {k: v.contiguous() for k, v in ref.items()}
    save_file(ref, str(OUT / "reference.safetensors"), metadata={"generator": "tools/reference/generate_training.py"})
    (OUT / "reference.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    log(f"wrote {OUT} ({(OUT / 'reference.safetensors').stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
