#!/usr/bin/env python3
"""Generate the numerical ground-truth fixtures for opt-rs from HF transformers' OPT.

Run from the repository root (any cwd works, paths are resolved from this file):

    .venv-ref/bin/python tools/reference/generate.py

Writes everything under <repo>/fixtures/ (see fixtures/README.md for the contents and the
conventions).  The script is deterministic: fixed seeds, one CPU thread, float32, eager
attention.  Rerunning on the same machine reproduces every file byte for byte.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GenerationConfig, OPTConfig, OPTForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"

EXPECTED_TORCH = "2.11.0"
EXPECTED_TRANSFORMERS = "5.17.0"

# Shared shapes / conventions -------------------------------------------------------------
BATCH, SEQ = 3, 16
RIGHT_PAD = 5  # row 1: last 5 positions are padding
LEFT_PAD = 4  # row 2: first 4 positions are padding
PAD, BOS, EOS = 1, 2, 2
FIRST_REAL_TOKEN = 3  # real tokens are drawn from [3, vocab)
GREEDY_PROMPT_LEN, GREEDY_NEW = 5, 24
BATCH_PROMPT_LEN, BATCH_LEFT_PAD = 7, 3

INPUT_SEED = 20240601
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
ADAMW_STEPS = 5
CLIP_MAX_NORM = 1.0

BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    ffn_dim=256,
    vocab_size=512,
    max_position_embeddings=64,
    activation_function="relu",
    enable_bias=True,
    do_layer_norm_before=True,
    word_embed_proj_dim=64,
    layer_norm_elementwise_affine=True,
    tie_word_embeddings=True,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
    dropout=0.1,
    attention_dropout=0.0,
    layerdrop=0.0,
)

# name -> (weight-init seed, config overrides)
MODELS = {
    "pre_ln": (1001, {}),
    "post_ln_proj": (1002, dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
    "galactica": (
        1003,
        dict(
            activation_function="gelu",
            enable_bias=False,
            layer_norm_elementwise_affine=False,
            num_hidden_layers=3,
        ),
    ),
    "no_final_ln": (1004, dict(_remove_final_layer_norm=True, tie_word_embeddings=False)),
}


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
# model construction
# ------------------------------------------------------------------------------------------
def make_model(name: str) -> OPTForCausalLM:
    seed, overrides = MODELS[name]
    cfg = OPTConfig(**{**BASE, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)  # HF's own init (overwritten below) must not consume ambient RNG state
    model = OPTForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    model.generation_config = GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD
    )
    init_weights(model, seed)
    model.eval()
    return model


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a private generator (order: named_parameters())."""
    g = torch.Generator().manual_seed(seed)
    ln_params = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            for pname, _ in mod.named_parameters(recurse=False):
                ln_params.add(f"{mname}.{pname}" if mname else pname)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = lambda std: torch.randn(p.shape, generator=g, dtype=torch.float32) * std  # noqa: E731
            if name in ln_params:
                if name.endswith(".weight"):
                    p.copy_(1.0 + noise(0.1))
                else:
                    p.copy_(noise(0.1))
            elif name.endswith(".bias"):
                p.copy_(noise(0.05))
            else:
                p.copy_(noise(0.1))


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def make_inputs(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(INPUT_SEED)
    rnd = lambda *shape: torch.randint(FIRST_REAL_TOKEN, vocab, shape, generator=g, dtype=torch.int64)  # noqa: E731

    ids = rnd(BATCH, SEQ)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    ids[1, SEQ - RIGHT_PAD :] = PAD
    mask[1, SEQ - RIGHT_PAD :] = 0
    ids[2, :LEFT_PAD] = PAD
    mask[2, :LEFT_PAD] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    # HF OPT's own position rule (modeling_opt.OPTDecoder.forward):
    position_ids = (torch.cumsum(mask, dim=1) * mask - 1).long()

    greedy_prompt = rnd(1, GREEDY_PROMPT_LEN)
    greedy_prompt[0, 0] = BOS

    bp = rnd(2, BATCH_PROMPT_LEN)
    bmask = torch.ones(2, BATCH_PROMPT_LEN, dtype=torch.int64)
    bp[0, 0] = BOS
    bp[1, :BATCH_LEFT_PAD] = PAD
    bmask[1, :BATCH_LEFT_PAD] = 0
    bp[1, BATCH_LEFT_PAD] = BOS

    train_ids = rnd(1, SEQ)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        position_ids=position_ids,
        greedy_prompt=greedy_prompt,
        greedy_batch_prompt=bp,
        greedy_batch_mask=bmask,
        train_ids=train_ids,
    )


# ------------------------------------------------------------------------------------------
# reference computations
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def forward_logits(model, ids, mask):
    model.eval()
    return model(input_ids=ids, attention_mask=mask).logits.float().contiguous()


def loss_and_grads(model, ids, mask, labels):
    model.eval()  # dropout off; gradients do not depend on train/eval otherwise (layerdrop=0)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grads[f"grad.{name}"] = p.grad.detach().clone().float().contiguous()
    loss = out.loss.detach().clone().float()
    model.zero_grad(set_to_none=True)
    return loss, grads


def check_train_mode_equivalence(model, ids, mask, labels, eval_loss, eval_grads):
    """labels loss in train() mode with a dropout=0 config == eval() mode (bitwise)."""
    cfg = copy.deepcopy(model.config)
    cfg.dropout = 0.0
    cfg.attention_dropout = 0.0
    m2 = OPTForCausalLM(cfg)
    m2.config._attn_implementation = "eager"
    m2.load_state_dict(model.state_dict())
    m2.train()
    out = m2(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.equal(out.loss.detach(), eval_loss), (out.loss.item(), eval_loss.item())
    for name, p in m2.named_parameters():
        assert torch.equal(p.grad, eval_grads[f"grad.{name}"]), name


def no_eos_generation_config(max_new: int) -> GenerationConfig:
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new,
        min_new_tokens=0,
        eos_token_id=None,
        bos_token_id=BOS,
        pad_token_id=PAD,
        use_cache=True,
    )


@torch.no_grad()
def greedy_generate(model, prompt, mask):
    model.eval()
    saved = model.generation_config
    # Make sure no EOS from the model's default generation config is merged back in.
    model.generation_config = GenerationConfig(bos_token_id=BOS, pad_token_id=PAD, eos_token_id=None)
    try:
        out = model.generate(
            prompt, attention_mask=mask, generation_config=no_eos_generation_config(GREEDY_NEW)
        )
    finally:
        model.generation_config = saved
    assert out.shape == (prompt.shape[0], prompt.shape[1] + GREEDY_NEW), out.shape
    return out.contiguous()


@torch.no_grad()
def greedy_manual(model, prompt, mask):
    """Plain argmax with full recomputation (no KV cache), mask extended with ones."""
    model.eval()
    ids, m = prompt.clone(), mask.clone()
    for _ in range(GREEDY_NEW):
        logits = model(input_ids=ids, attention_mask=m, use_cache=False).logits[:, -1, :]
        nxt = logits.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        m = torch.cat([m, torch.ones_like(nxt)], dim=1)
    return ids


def per_token_loss(logits, labels):
    """token_loss[b, t] = CE(logits[b, t], labels[b, t + 1]); 0 where the target is -100 and at t = T-1."""
    b, t, v = logits.shape
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    ).view(b, t - 1)
    out = torch.zeros(b, t, dtype=torch.float32)
    out[:, :-1] = ce
    return out.contiguous(), int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def greedy_margins(model, ids, prompt_mask):
    """Smallest top1-top2 logit gap over the generated steps (how robust the argmax is)."""
    p = prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, torch.ones(ids.shape[0], ids.shape[1] - p, dtype=torch.int64)], 1)
    lg = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    top = lg[:, p - 1 : -1].topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


@torch.no_grad()
def round_weights_bf16(model):
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.data = p.data.bfloat16().float()
    return m


def adamw_trajectory(model, train_ids, clip: bool):
    m = copy.deepcopy(model)
    m.eval()  # dropout disabled
    opt = torch.optim.AdamW(m.parameters(), **ADAMW)
    losses, norms = [], []
    for _ in range(ADAMW_STEPS):
        out = m(input_ids=train_ids, labels=train_ids)
        out.loss.backward()
        losses.append(out.loss.detach().float().clone())
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(list(m.parameters()), CLIP_MAX_NORM).detach().float().clone())
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = {f"adamw_after.{n}": p.detach().clone().float().contiguous() for n, p in m.named_parameters()}
    return torch.stack(losses), (torch.stack(norms) if clip else None), after


# ------------------------------------------------------------------------------------------
# alternative layouts of pre_ln
# ------------------------------------------------------------------------------------------
def save_bin(model, d: Path):
    """pytorch_model.bin as transformers<5 wrote it with save_pretrained(safe_serialization=False).

    transformers 5.x's save_pretrained has no safe_serialization switch any more (always
    safetensors), so the pickle is written with torch.save of the full state_dict.  As in 4.x,
    the tied lm_head.weight is included and shares storage with model.decoder.embed_tokens.weight.
    """
    d.mkdir(parents=True)
    model.config.save_pretrained(d)
    model.generation_config.save_pretrained(d)
    sd = model.state_dict()
    assert "lm_head.weight" in sd
    torch.save(sd, d / "pytorch_model.bin")


def save_layouts(model, ref_logits, ref_logits_bf16w, inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    d = FIXTURES / "pre_ln_bin"
    save_bin(model, d)

    d = FIXTURES / "pre_ln_sharded"
    model.save_pretrained(d, max_shard_size="150KB")
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (d / "model.safetensors.index.json").exists(), shards

    d = FIXTURES / "pre_ln_decoder_prefix"
    model.model.save_pretrained(d)  # bare OPTModel -> keys "decoder.*"
    with safe_open(d / "model.safetensors", "pt") as f:
        assert all(k.startswith("decoder.") for k in f.keys())

    d = FIXTURES / "pre_ln_bf16"
    mb = copy.deepcopy(model).to(torch.bfloat16)
    mb.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.get("dtype") == "bfloat16", cfg.get("dtype")

    # Every layout must load in HF to the same logits.
    for name, expect in [
        ("pre_ln_bin", ref_logits),
        ("pre_ln_sharded", ref_logits),
        ("pre_ln_decoder_prefix", ref_logits),
        ("pre_ln_bf16", ref_logits_bf16w),
    ]:
        m, info = OPTForCausalLM.from_pretrained(
            FIXTURES / name, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        got = forward_logits(m, ids, mask)
        assert torch.equal(got, expect), (name, (got - expect).abs().max().item())
        log(f"  layout {name}: reloads to identical logits")


# ------------------------------------------------------------------------------------------
def summary_stats(t: torch.Tensor) -> dict:
    return dict(shape=list(t.shape), mean=float(t.mean()), std=float(t.std()), absmax=float(t.abs().max()))


def process_model(name: str, inputs: dict) -> dict:
    log(f"== {name}")
    model = make_model(name)
    d = FIXTURES / name
    model.save_pretrained(d)

    # Reload what was just written and use *that* (proves the folder is self-contained).
    reloaded, info = OPTForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    if name == "no_final_ln":
        assert reloaded.model.decoder.final_layer_norm is None
        assert reloaded.lm_head.weight is not reloaded.model.decoder.embed_tokens.weight
    model = reloaded
    model.eval()

    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    ref: dict[str, torch.Tensor] = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "position_ids": inputs["position_ids"],
    }

    logits = forward_logits(model, ids, mask)
    ref["logits"] = logits

    loss, grads = loss_and_grads(model, ids, mask, labels)
    check_train_mode_equivalence(model, ids, mask, labels, loss, grads)
    ref["loss"] = loss
    ref.update(grads)
    token_loss, n_loss_tokens = per_token_loss(logits, labels)
    assert torch.allclose(token_loss.sum() / n_loss_tokens, loss, rtol=1e-6, atol=1e-6)
    ref["token_loss"] = token_loss

    gp = inputs["greedy_prompt"]
    greedy = greedy_generate(model, gp, torch.ones_like(gp))
    manual = greedy_manual(model, gp, torch.ones_like(gp))
    assert torch.equal(greedy, manual), (greedy, manual)
    ref["greedy_prompt"] = gp
    ref["greedy_ids"] = greedy

    bp, bm = inputs["greedy_batch_prompt"], inputs["greedy_batch_mask"]
    bgreedy = greedy_generate(model, bp, bm)
    bmanual = greedy_manual(model, bp, bm)
    assert torch.equal(bgreedy, bmanual), (bgreedy, bmanual)
    ref["greedy_batch_prompt"] = bp
    ref["greedy_batch_mask"] = bm
    ref["greedy_batch_ids"] = bgreedy

    mbf = round_weights_bf16(model)
    logits_bf16w = forward_logits(mbf, ids, mask)
    ref["logits_bf16w"] = logits_bf16w

    summary = {
        "config": {k: getattr(model.config, k) for k in sorted({**BASE, **MODELS[name][1]})},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "parameter_names": [n for n, _ in model.named_parameters()],
        "loss": float(loss),
        "n_loss_tokens": n_loss_tokens,
        "greedy_min_top2_margin": greedy_margins(model, greedy, torch.ones_like(gp)),
        "greedy_batch_min_top2_margin": greedy_margins(model, bgreedy, bm),
        "logits": summary_stats(logits),
        "logits_bf16w_max_abs_diff": float((logits_bf16w - logits).abs().max()),
        "greedy_prompt": gp.tolist(),
        "greedy_ids": greedy.tolist(),
        "greedy_batch_prompt": bp.tolist(),
        "greedy_batch_mask": bm.tolist(),
        "greedy_batch_ids": bgreedy.tolist(),
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
    }
    log(f"  logits std {summary['logits']['std']:.4f}  loss {float(loss):.6f}")
    log(f"  greedy {greedy.tolist()[0][GREEDY_PROMPT_LEN:]}")

    if name == "pre_ln":
        train_ids = inputs["train_ids"]
        ref["train_ids"] = train_ids
        losses, _, after = adamw_trajectory(model, train_ids, clip=False)
        ref["adamw_losses"] = losses
        ref.update(after)
        closses, cnorms, _ = adamw_trajectory(model, train_ids, clip=True)
        ref["adamw_clip_losses"] = closses
        ref["adamw_clip_grad_norms"] = cnorms
        summary.update(
            train_ids=train_ids.tolist(),
            adamw=dict(ADAMW, betas=list(ADAMW["betas"]), steps=ADAMW_STEPS),
            adamw_losses=losses.tolist(),
            adamw_clip_max_norm=CLIP_MAX_NORM,
            adamw_clip_losses=closses.tolist(),
            adamw_clip_grad_norms=cnorms.tolist(),
        )
        log(f"  adamw losses {losses.tolist()}")
        log(f"  clip losses {closses.tolist()} norms {cnorms.tolist()}")
        save_layouts(model, logits, logits_bf16w, inputs)

    for k, v in ref.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    ref = {k: v.contiguous() for k, v in ref.items()}
    save_file(ref, str(d / "reference.safetensors"), metadata={"generator": "tools/reference/generate.py"})
    summary["tensors"] = {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sorted(ref.items())}
    summary["versions"] = versions()
    (d / "reference.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def main() -> int:
    if torch.__version__.split("+")[0] != EXPECTED_TORCH or transformers.__version__ != EXPECTED_TRANSFORMERS:
        log(
            f"WARNING: expected torch {EXPECTED_TORCH} / transformers {EXPECTED_TRANSFORMERS}, "
            f"got {torch.__version__} / {transformers.__version__}"
        )
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    names = list(MODELS) + ["pre_ln_bin", "pre_ln_sharded", "pre_ln_decoder_prefix", "pre_ln_bf16"]
    FIXTURES.mkdir(exist_ok=True)
    for n in names:
        if (FIXTURES / n).exists():
            shutil.rmtree(FIXTURES / n)

    inputs = make_inputs(BASE["vocab_size"])
    for name in MODELS:
        process_model(name, inputs)

    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    log(f"total fixture size: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
