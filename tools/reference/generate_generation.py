#!/usr/bin/env python3
"""Ground truth for opt-rs decoding (crates/opt-generate) from HF transformers' `generate()`.

Run from the repository root after `tools/reference/generate.py` has written the fixture models:

    .venv-ref/bin/python tools/reference/generate_generation.py

Writes fixtures/generation/ (see fixtures/generation/README.md):
- generation.json: greedy, min_new_tokens and beam-search outputs of the four fixture models;
- processors.safetensors + processors.json: HF's logits processors applied to fixture logits,
  with the processed scores and their softmax.

Deterministic: float32, eager attention, one CPU thread, fixed seeds, no sampling.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GenerationConfig, OPTForCausalLM  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
OUT = FIXTURES / "generation"

MODELS = ["pre_ln", "post_ln_proj", "galactica", "no_final_ln"]
PAD, BOS, EOS = 1, 2, 2
PROMPT_SEED = 7001
SINGLE_LEN = 7  # `</s>` + 6 random tokens
BATCH_LENS = (8, 5)  # a left-padded batch of two prompts (row 1 gets 3 pads)
GREEDY_NEW = 20
BEAM_NEW = 12
# Where the "chosen EOS" comes from: the greedy continuation's token at this step. Real EOS
# (id 2) is almost never the argmax of these random models, so to exercise EOS handling,
# min_new_tokens and finished beam hypotheses we declare a frequent token to be the EOS.
EOS_PROBE_STEP = 4

# (name, num_beams, length_penalty, early_stopping, num_return_sequences, extra generate kwargs)
BEAM_CASES = [
    ("beam2_lp1.5_early", 2, 1.5, True, 2, {}),
    ("beam2_lp0.7_noearly", 2, 0.7, False, 2, {}),
    ("beam4_lp2.0_noearly", 4, 2.0, False, 4, {}),
    ("beam4_lp0.5_early", 4, 0.5, True, 4, {}),
    ("beam4_lp1.3_never", 4, 1.3, "never", 3, {}),
    ("beam4_lp-0.5_noearly", 4, -0.5, False, 2, {}),
    ("beam3_penalties", 3, 1.2, False, 3, dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4)),
]


def log(*a):
    print(*a, flush=True)


def load(name: str) -> OPTForCausalLM:
    m = OPTForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    # No defaults merged from the folder's generation_config.json: every case passes a full config.
    m.generation_config = GenerationConfig(bos_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS)
    return m


def make_prompts(vocab: int):
    g = torch.Generator().manual_seed(PROMPT_SEED)
    rnd = lambda n: torch.randint(3, vocab, (n,), generator=g, dtype=torch.int64)  # noqa: E731
    single = torch.cat([torch.tensor([BOS]), rnd(SINGLE_LEN - 1)]).view(1, -1)
    rows = [torch.cat([torch.tensor([BOS]), rnd(n - 1)]) for n in BATCH_LENS]
    width = max(BATCH_LENS)
    batch = torch.full((2, width), PAD, dtype=torch.int64)
    mask = torch.zeros((2, width), dtype=torch.int64)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return single, batch, mask


def gen_config(eos, max_new, **kw) -> GenerationConfig:
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=eos,
        use_cache=True,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )


def real_tokens(row: torch.Tensor, mask_row: torch.Tensor) -> list[int]:
    return [int(t) for t, m in zip(row.tolist(), mask_row.tolist()) if m]


@torch.no_grad()
def greedy_case(model, name, prompts, mask, eos, max_new, **kw):
    out = model.generate(prompts, attention_mask=mask, generation_config=gen_config(eos, max_new, num_beams=1, **kw))
    p = prompts.shape[1]
    seqs = []
    for b in range(prompts.shape[0]):
        gen = out.sequences[b, p:].tolist()
        if eos is not None and eos in gen:
            gen = gen[: gen.index(eos) + 1]  # rows that finished early are padded after their EOS
        seqs.append([gen])
    return dict(
        name=name,
        kind="greedy",
        prompts=[real_tokens(prompts[b], mask[b]) for b in range(prompts.shape[0])],
        eos_token_id=eos,
        options=dict(max_new_tokens=max_new, **kw),
        outputs=seqs,
    )


@torch.no_grad()
def beam_case(model, name, prompts, mask, eos, max_new, nb, lp, es, nret, kw):
    cfg = gen_config(eos, max_new, num_beams=nb, length_penalty=lp, early_stopping=es, num_return_sequences=nret, **kw)
    out = model.generate(prompts, attention_mask=mask, generation_config=cfg)
    p = prompts.shape[1]
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
    seqs, scores = [], []
    for b in range(prompts.shape[0]):
        rows = range(b * nret, (b + 1) * nret)
        seqs.append([out.sequences[r, p : p + lengths[r]].tolist() for r in rows])
        scores.append([float(out.sequences_scores[r]) for r in rows])
    return dict(
        name=name,
        kind="beam",
        prompts=[real_tokens(prompts[b], mask[b]) for b in range(prompts.shape[0])],
        eos_token_id=eos,
        options=dict(
            max_new_tokens=max_new, num_beams=nb, length_penalty=lp, early_stopping=es, n=nret, **kw
        ),
        outputs=seqs,
        scores=scores,
    )


def generation_cases(name: str) -> tuple[list[dict], dict]:
    model = load(name)
    single, batch, bmask = make_prompts(model.config.vocab_size)
    ones = torch.ones_like(single)
    cases = [greedy_case(model, "greedy", single, ones, EOS, GREEDY_NEW)]
    probe = cases[0]["outputs"][0][0]
    eos = probe[EOS_PROBE_STEP]
    cases.append(greedy_case(model, "greedy_eos", single, ones, eos, GREEDY_NEW))
    cases.append(greedy_case(model, "greedy_eos_min_new", single, ones, eos, GREEDY_NEW, min_new_tokens=12))
    cases.append(greedy_case(model, "greedy_penalties", single, ones, EOS, GREEDY_NEW, repetition_penalty=1.5, no_repeat_ngram_size=2))
    cases.append(greedy_case(model, "greedy_batch_eos_min_new", batch, bmask, eos, GREEDY_NEW, min_new_tokens=6))
    # The acceptance command: `--ids 2,5,9 --max-new-tokens 24 --min-new-tokens 24 --greedy`.
    accept = torch.tensor([[2, 5, 9]])
    cases.append(greedy_case(model, "acceptance", accept, torch.ones_like(accept), EOS, 24, min_new_tokens=24))
    # Beam searches get their own EOS: the best beam's token at step EOS_PROBE_STEP - 1 of a
    # probe search with the real EOS, so that several hypotheses finish early.
    probe = beam_case(model, "probe", single, ones, EOS, BEAM_NEW, 4, 1.0, False, 1, {})["outputs"][0][0]
    beam_eos = probe[EOS_PROBE_STEP - 1]
    for cname, nb, lp, es, nret, kw in BEAM_CASES:
        cases.append(beam_case(model, cname, single, ones, beam_eos, BEAM_NEW, nb, lp, es, nret, kw))
    cases.append(beam_case(model, "beam3_batch", batch, bmask, beam_eos, BEAM_NEW, 3, 1.2, False, 2, {}))
    for c in cases:
        c["model"] = name
    stats = dict(
        eos=eos,
        beam_eos=beam_eos,
        greedy_eos_len=len(cases[1]["outputs"][0][0]),
        beam_hyps_ending_in_eos=sum(
            s[-1] == beam_eos for c in cases if c["kind"] == "beam" for row in c["outputs"] for s in row if s
        ),
    )
    return cases, stats


# ------------------------------------------------------------------------------------------
# logits processors on fixture logits
# ------------------------------------------------------------------------------------------
PROC_ROWS = 4
PROC_SEQ = 20


@torch.no_grad()
def processor_inputs():
    """Four rows of pre_ln logits: two as they are, one sharpened (x4), one sharpened with a
    three-way tie at ranks 5-7 (top-k's boundary rule keeps all tied tokens)."""
    model = load("pre_ln")
    g = torch.Generator().manual_seed(PROMPT_SEED + 1)
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=g)
    logits = model(input_ids=ids).logits[0, -PROC_ROWS:].clone()
    logits[2] *= 4.0
    logits[3] *= 4.0
    order = torch.argsort(logits[3], descending=True)
    logits[3, order[5:8]] = logits[3, order[5]].item()
    # Token histories with repeats (small id range) for the repetition / n-gram processors; the
    # last two tokens of each row occur earlier too, so 2- and 3-grams get banned.
    hist = torch.randint(3, 24, (PROC_ROWS, PROC_SEQ), generator=g)
    hist[:, 6:8] = hist[:, -2:]
    return logits.contiguous(), hist.contiguous()


def processor_cases():
    # name -> (description for Rust, list of processors in application order)
    def mk(*ps):
        return LogitsProcessorList(list(ps))

    return {
        "temperature_0.7": (dict(temperature=0.7), mk(TemperatureLogitsWarper(0.7))),
        "temperature_1.5": (dict(temperature=1.5), mk(TemperatureLogitsWarper(1.5))),
        "top_k_1": (dict(top_k=1), mk(TopKLogitsWarper(1))),
        "top_k_6": (dict(top_k=6), mk(TopKLogitsWarper(6))),
        "top_k_50": (dict(top_k=50), mk(TopKLogitsWarper(50))),
        "top_p_0.05": (dict(top_p=0.05), mk(TopPLogitsWarper(0.05))),
        "top_p_0.5": (dict(top_p=0.5), mk(TopPLogitsWarper(0.5))),
        "top_p_0.9": (dict(top_p=0.9), mk(TopPLogitsWarper(0.9))),
        "typical_0.2": (dict(typical_p=0.2), mk(TypicalLogitsWarper(0.2))),
        "typical_0.9": (dict(typical_p=0.9), mk(TypicalLogitsWarper(0.9))),
        "repetition_1.3": (dict(repetition_penalty=1.3), mk(RepetitionPenaltyLogitsProcessor(1.3))),
        "repetition_0.7": (dict(repetition_penalty=0.7), mk(RepetitionPenaltyLogitsProcessor(0.7))),
        "no_repeat_ngram_1": (dict(no_repeat_ngram_size=1), mk(NoRepeatNGramLogitsProcessor(1))),
        "no_repeat_ngram_2": (dict(no_repeat_ngram_size=2), mk(NoRepeatNGramLogitsProcessor(2))),
        "no_repeat_ngram_3": (dict(no_repeat_ngram_size=3), mk(NoRepeatNGramLogitsProcessor(3))),
        # The history is PROC_SEQ = 20 tokens, of which the last 5 count as generated.
        "min_new_tokens_10": (
            dict(min_new_tokens=10, prompt_len=15, eos_token_id=EOS),
            mk(MinNewTokensLengthLogitsProcessor(15, 10, EOS)),
        ),
        "min_new_tokens_3": (
            dict(min_new_tokens=3, prompt_len=15, eos_token_id=EOS),
            mk(MinNewTokensLengthLogitsProcessor(15, 3, EOS)),
        ),
        # HF's order for sampling: penalties, then temperature, top-k, top-p, typical.
        "chain": (
            dict(repetition_penalty=1.2, no_repeat_ngram_size=2, temperature=0.8, top_k=40, top_p=0.9, typical_p=0.95),
            mk(
                RepetitionPenaltyLogitsProcessor(1.2),
                NoRepeatNGramLogitsProcessor(2),
                TemperatureLogitsWarper(0.8),
                TopKLogitsWarper(40),
                TopPLogitsWarper(0.9),
                TypicalLogitsWarper(0.95),
            ),
        ),
    }


def processors() -> tuple[dict[str, torch.Tensor], dict]:
    scores, hist = processor_inputs()
    tensors = {"scores": scores, "input_ids": hist}
    meta = {}
    for name, (params, procs) in processor_cases().items():
        out = procs(hist, scores.clone())
        probs = torch.softmax(out, dim=-1)
        tensors[f"{name}.scores"] = out.contiguous()
        tensors[f"{name}.probs"] = probs.contiguous()
        kept = torch.isfinite(out).sum(dim=-1).tolist()
        meta[name] = dict(params=params, kept_per_row=kept)
    return tensors, meta


def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in MODELS:
        if not (FIXTURES / name / "model.safetensors").is_file():
            log(f"missing fixtures/{name}: run tools/reference/generate.py first")
            return 1
    OUT.mkdir(exist_ok=True)

    all_cases = []
    for name in MODELS:
        cases, stats = generation_cases(name)
        log(f"{name}: {len(cases)} cases, {stats}")
        all_cases.extend(cases)
    doc = dict(
        generator="tools/reference/generate_generation.py",
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        cases=all_cases,
    )
    (OUT / "generation.json").write_text(json.dumps(doc, indent=1) + "\n")

    tensors, meta = processors()
    save_file(tensors, str(OUT / "processors.safetensors"), metadata={"generator": "tools/reference/generate_generation.py"})
    (OUT / "processors.json").write_text(json.dumps(dict(rows=PROC_ROWS, cases=meta), indent=1) + "\n")
    for name, m in meta.items():
        log(f"processor {name}: kept per row {m['kept_per_row']}")
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    log(f"fixtures/generation: {total} bytes")
    assert total < 1_000_000
    assert not any(math.isnan(float(x)) for c in all_cases for row in c.get("scores", []) for x in row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
