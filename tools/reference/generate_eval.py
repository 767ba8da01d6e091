#!/usr/bin/env python3
"""Ground truth for `opt-eval`: lm-evaluation-harness-style scores computed with HF transformers.

Run from the repository root (paths are resolved from this file):

    .venv-ref/bin/python tools/reference/generate_eval.py

Writes
- fixtures/eval_model/: a random-weight OPT with the real 50272-row vocabulary (hidden 16,
  2 layers, 2 heads, ffn 64, 96 positions), stored in float16 to keep it small;
- fixtures/eval/: ~20-item excerpts of every built-in task in the layout of
  shared/data/eval (so `--data-dir fixtures/eval` works), a hand-written schema file, and
  reference.json with per-request token ids, log-likelihoods, greedy flags, acc/acc_norm and
  sliding-window perplexities.

The scoring here is written independently of the Rust code, straight from the harness's rules,
and uses the plainest possible evaluation: one unpadded sequence per forward, float32, eager
attention, the f16 weights upcast to f32. See fixtures/eval/README.md for every convention.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.decoders import ByteLevel as ByteLevelDecoder  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402
from transformers import OPTConfig, OPTForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
DATA = SHARED / "eval"
TOKENIZER = REPO / "assets" / "tokenizer"
MODEL_DIR = REPO / "fixtures" / "eval_model"
OUT = REPO / "fixtures" / "eval"

SEED = 4242
BOS = 2
MAX_LEN = 96  # max_position_embeddings: also the harness's max_length, so some items get truncated
N_ITEMS = 20
WIKITEXT_ROWS = 40
WIKITEXT_STRIDES = [32, 96]

CONFIG = dict(
    vocab_size=50272,
    hidden_size=16,
    num_attention_heads=2,
    num_hidden_layers=2,
    ffn_dim=64,
    max_position_embeddings=MAX_LEN,
    activation_function="relu",
    do_layer_norm_before=True,
    word_embed_proj_dim=16,
    enable_bias=True,
    layer_norm_elementwise_affine=True,
    tie_word_embeddings=True,
    pad_token_id=1,
    bos_token_id=BOS,
    eos_token_id=BOS,
    dropout=0.0,
    attention_dropout=0.0,
    layerdrop=0.0,
)

# Hand-written winograd-style items in llm-foundry's `schema` layout (no public data needed).
SCHEMA_ITEMS = [
    {"context_options": ["The bottle did not fit in the bag because the bottle", "The bottle did not fit in the bag because the bag"], "continuation": "was too big.", "gold": 0},
    {"context_options": ["Anna lent her umbrella to Maria because Anna", "Anna lent her umbrella to Maria because Maria"], "continuation": "had forgotten hers at home.", "gold": 1},
    {"context_options": ["The dog chased the cat up the tree, so the dog", "The dog chased the cat up the tree, so the cat"], "continuation": "stayed on the branch all night.", "gold": 1},
    {"context_options": ["The engineer thanked the pilot because the engineer", "The engineer thanked the pilot because the pilot"], "continuation": "landed the plane safely.", "gold": 1},
    {"context_options": ["The soup was colder than the tea, so the soup", "The soup was colder than the tea, so the tea"], "continuation": "needed to be warmed up again.", "gold": 0},
    {"context_options": ["Tom could not lift the box onto the shelf because the box", "Tom could not lift the box onto the shelf because the shelf"], "continuation": "was too heavy.", "gold": 0},
]


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
# tokenizer: GPT-2 byte-level BPE with OPT's ids, no prefix space, </s> prepended
# ------------------------------------------------------------------------------------------
def make_tokenizer() -> Tokenizer:
    tok = Tokenizer(BPE.from_file(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt")))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = ByteLevelDecoder()
    pairs = json.loads((SHARED / "tokenizer" / "opt_tokenization_pairs.json").read_text())
    checked = 0
    for case in pairs["cases"]:
        text, ids = case.get("text"), case.get("ids")
        if case.get("prefix") != [BOS] or not isinstance(text, str) or "</s>" in text or "<pad>" in text:
            continue
        assert enc_with(tok, text) == ids, (text, ids)
        checked += 1
    log(f"tokenizer: {checked} published OPT pairs reproduce")
    return tok


def enc_with(tok: Tokenizer, text: str) -> list[int]:
    return [BOS] + tok.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
def make_model() -> OPTForCausalLM:
    cfg = OPTConfig(**CONFIG)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "layer_norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.05 * noise)
            elif "embed_tokens" in name:
                # Wide embeddings so the (tied) LM head gives peaked distributions: choices then
                # differ by clear margins, and acc/acc_norm cannot flip on rounding noise.
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def save_and_reload(model: OPTForCausalLM) -> OPTForCausalLM:
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    half = model.to(torch.float16)
    half.save_pretrained(MODEL_DIR)
    for extra in ["generation_config.json"]:
        (MODEL_DIR / extra).unlink(missing_ok=True)
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg.get("dtype") == "float16", cfg.get("dtype")
    m, info = OPTForCausalLM.from_pretrained(
        MODEL_DIR, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for (n1, p1), (n2, p2) in zip(half.named_parameters(), m.named_parameters()):
        assert n1 == n2 and torch.equal(p1.float(), p2), n1
    assert m.model.decoder.embed_tokens.weight.dtype == torch.float32
    m.eval()
    return m


# ------------------------------------------------------------------------------------------
# lm-evaluation-harness rules
# ------------------------------------------------------------------------------------------
class Harness:
    def __init__(self, model: OPTForCausalLM, tok: Tokenizer):
        self.model = model
        self.tok = tok

    def enc(self, text: str) -> list[int]:
        return enc_with(self.tok, text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # HFLM._encode_pair: trailing whitespace of the context moves onto the continuation;
        # continuation ids are what enc(context + continuation) has beyond len(enc(context)).
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.enc(context + continuation)
        ctx = self.enc(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str) -> dict:
        ctx, cont = self.encode_pair(context, continuation)
        # HFLM._loglikelihood_tokens: keep the last max_length + 1 tokens, feed all but the last.
        whole = (ctx + cont)[-(MAX_LEN + 1):]
        inp = whole[:-1]
        logits = self.model(input_ids=torch.tensor([inp])).logits[0].float()
        lsm = torch.log_softmax(logits, dim=-1)
        n = len(cont)
        rows = lsm[len(inp) - n: len(inp)]
        target = torch.tensor(cont)
        lp = rows.gather(1, target[:, None])[:, 0]
        greedy = bool((rows.argmax(dim=-1) == target).all())
        return dict(
            context=context,
            continuation=continuation,
            context_ids=ctx,
            continuation_ids=cont,
            loglikelihood=float(lp.double().sum()),
            is_greedy=greedy,
            truncated=len(ctx) + len(cont) > MAX_LEN + 1,
        )

    def multiple_choice(self, docs: list[dict]) -> dict:
        """docs: {"requests": [(context, continuation)], "norm_lens": [...], "gold": g}."""
        items = []
        gaps = []
        for d in docs:
            reqs = [self.loglikelihood(c, x) for c, x in d["requests"]]
            lls = [r["loglikelihood"] for r in reqs]
            norm = [ll / n for ll, n in zip(lls, d["norm_lens"])]
            pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
            pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
            gaps.append(top_gap(lls))
            gaps.append(top_gap(norm))
            items.append(dict(requests=reqs, norm_lens=d["norm_lens"], gold=d["gold"], pred=pred, pred_norm=pred_norm))
        n = len(items)
        acc = sum(i["pred"] == i["gold"] for i in items) / n
        acc_norm = sum(i["pred_norm"] == i["gold"] for i in items) / n
        return dict(n=n, acc=acc, acc_norm=acc_norm, min_top2_gap=min(gaps), items=items)


def top_gap(xs: list[float]) -> float:
    s = sorted(xs, reverse=True)
    return s[0] - s[1] if len(s) > 1 else math.inf


def hellaswag_preprocess(text: str) -> str:
    # lm_eval/tasks/hellaswag/utils.py: preprocess
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_query(line: str) -> str:
    """The layout's first line is `activity_label: ctx_a ctx_b` without the harness's
    `ctx_b.capitalize()`. ctx_b is the unfinished fragment after the last sentence end; when the
    line does not end a sentence and that fragment starts with a lower-case letter, upper-case it
    (capitalize() would also lower-case the rest, which this layout cannot reproduce)."""
    s = line.strip()
    if s and s[-1] not in ".!?\"'":
        m = None
        for m in re.finditer(r"[.!?] ", s):
            pass
        start = m.end() if m else (s.find(": ") + 2 if ": " in s else 0)
        if start < len(s) and s[start].islower():
            s = s[:start] + s[start].upper() + s[start + 1:]
    return hellaswag_preprocess(s)


# ------------------------------------------------------------------------------------------
# task excerpts
# ------------------------------------------------------------------------------------------
def read_lines(p: Path) -> list[str]:
    return p.read_text(encoding="utf-8").split("\n")


def excerpt_lambada() -> list[str]:
    lines = [l for l in read_lines(DATA / "lambada_test.jsonl") if l.strip()][:N_ITEMS]
    (OUT / "lambada_test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def excerpt_lines_for_probe() -> list[str]:
    return [l for l in read_lines(OUT / "lambada_test.jsonl") if l.strip()]


def excerpt_hellaswag() -> tuple[list[list[str]], list[int]]:
    lines = []
    for k in (1, 2, 3):
        part = read_lines(DATA / f"hellaswag_val_full.part{k}of3.txt")
        if part and part[-1] == "":
            part = part[:-1]
        lines += part
    tasks = [lines[i: i + 6] for i in range(0, len(lines), 6)]
    # 12 ActivityNet items from the start, 4 WikiHow items (contexts that end a sentence) and
    # the 4 first items with leftover brackets, which the harness's regex removes.
    picked = list(range(12))
    wikihow = [i for i, t in enumerate(tasks) if t[0].rstrip()[-1:] in ".!?" and i > 5000][:4]
    brackets = [i for i, t in enumerate(tasks) if any("[" in x for x in t[:1] + t[2:])][:4]
    picked += wikihow + brackets
    sel = [tasks[i] for i in picked]
    (OUT / "hellaswag_val_full.txt").write_text("\n".join(l for t in sel for l in t) + "\n", encoding="utf-8")
    return sel, picked


def excerpt_piqa() -> tuple[list[dict], list[int]]:
    lines = [l for l in read_lines(DATA / "piqa_valid.jsonl") if l.strip()][:N_ITEMS]
    labels = [l for l in read_lines(DATA / "piqa_valid-labels.lst") if l.strip()][:N_ITEMS]
    (OUT / "piqa_valid.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (OUT / "piqa_valid-labels.lst").write_text("\n".join(labels) + "\n", encoding="utf-8")
    return [json.loads(l) for l in lines], [int(x) for x in labels]


def excerpt_arc() -> list[dict]:
    lines = [l for l in read_lines(DATA / "llmfoundry_arc_easy.jsonl") if l.strip()][:N_ITEMS]
    (OUT / "llmfoundry_arc_easy.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [json.loads(l) for l in lines]


def excerpt_wikitext() -> str:
    lines = read_lines(DATA / "wikitext-2-raw-test.lf.txt")[:WIKITEXT_ROWS]
    (OUT / "wikitext-2-raw-test.lf.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return wikitext_text(lines)


def wikitext_text(lines: list[str]) -> str:
    # One file line per HF dataset row: non-empty rows end with "\n" (the line break), empty
    # rows are "". The HF perplexity guide scores "\n\n".join(rows).
    rows = [l + "\n" if l else "" for l in lines]
    return "\n\n".join(rows)


# ------------------------------------------------------------------------------------------
# sliding-window perplexity (HF perplexity guide)
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def sliding_window(model, ids: list[int], max_len: int, stride: int) -> dict:
    seq_len = len(ids)
    nll_sum = 0.0
    n_tokens = 0
    windows = []
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_len, seq_len)
        trg_len = end - prev_end
        inp = torch.tensor([ids[begin:end]])
        target = inp.clone()
        target[:, :-trg_len] = -100
        out = model(input_ids=inp, labels=target)
        # The loss is the mean over the targets that survive the internal shift; count them
        # exactly (the guide's `num_valid - batch_size` is exact only for the first window).
        n = int((target[:, 1:] != -100).sum())
        s = float(out.loss.double()) * n
        # Cross-check against an explicit per-token sum.
        lsm = torch.log_softmax(out.logits[0].float(), dim=-1)
        explicit = 0.0
        first = max(prev_end, begin + 1)
        for t in range(first, end):
            explicit -= float(lsm[t - 1 - begin, ids[t]])
        assert abs(explicit - s) < 1e-3 * max(1.0, abs(s)), (explicit, s)
        nll_sum += s
        n_tokens += n
        windows.append(dict(begin=begin, end=end, first_target=first, n=n, nll=s))
        prev_end = end
        if end == seq_len:
            break
    return dict(max_length=max_len, stride=stride, n_tokens=n_tokens, nll_sum=nll_sum, windows=windows)


# ------------------------------------------------------------------------------------------
def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    tok = make_tokenizer()
    model = save_and_reload(make_model())
    h = Harness(model, tok)
    if OUT.exists():
        for p in OUT.iterdir():
            if p.name != "README.md":
                p.unlink()
    OUT.mkdir(parents=True, exist_ok=True)
    ref: dict = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "max_length": MAX_LEN}

    # lambada (lambada_openai): context = all but the last space-separated word, target = " " + it.
    items = []
    for line in excerpt_lambada():
        text = json.loads(line)["text"]
        context, word = text.rsplit(" ", 1)
        items.append(h.loglikelihood(context, " " + word))
    lls = [i["loglikelihood"] for i in items]
    ref["lambada"] = dict(
        n=len(items),
        acc=sum(i["is_greedy"] for i in items) / len(items),
        perplexity=math.exp(-sum(lls) / len(lls)),
        items=items,
    )
    # Random weights never guess a LAMBADA word, so is_greedy would only ever be false. Probe
    # the true branch: continuations built from the model's own greedy tokens.
    probes = []
    for line in excerpt_lines_for_probe():
        context = json.loads(line)["text"].rsplit(" ", 1)[0]
        ids = h.enc(context)
        if len(ids) + 3 > MAX_LEN or len(probes) == 6:
            continue
        greedy = []
        with torch.no_grad():
            for _ in range(3):
                logits = model(input_ids=torch.tensor([ids + greedy])).logits[0, -1]
                greedy.append(int(logits.argmax()))
        cont = tok.decode(greedy)
        if "\ufffd" in cont or not cont:
            continue
        r = h.loglikelihood(context, cont)
        if r["continuation_ids"] == greedy:
            assert r["is_greedy"], r
            probes.append(r)
    assert len(probes) >= 3, len(probes)
    ref["greedy_probe"] = dict(n=len(probes), items=probes)
    log(f"greedy probe: {len(probes)} requests with is_greedy = true")
    log(f"lambada: acc {ref['lambada']['acc']:.3f} ppl {ref['lambada']['perplexity']:.1f} truncated {sum(i['truncated'] for i in items)}")

    # hellaswag
    sel, picked = excerpt_hellaswag()
    docs = []
    for t in sel:
        query = hellaswag_query(t[0])
        endings = [hellaswag_preprocess(e) for e in t[2:6]]
        docs.append(dict(requests=[(query, " " + e) for e in endings], norm_lens=[len(e) for e in endings], gold=int(t[1])))
    ref["hellaswag"] = h.multiple_choice(docs)
    ref["hellaswag"]["source_tasks"] = picked

    # piqa
    goals, labels = excerpt_piqa()
    docs = []
    for d, lab in zip(goals, labels):
        q = f"Question: {d['goal']}\nAnswer:"
        sols = [d["sol1"], d["sol2"]]
        docs.append(dict(requests=[(q, " " + s) for s in sols], norm_lens=[len(s) for s in sols], gold=lab))
    ref["piqa"] = h.multiple_choice(docs)

    # arc_easy from llm-foundry's jsonl: query is "Question: ..." without the "\nAnswer:" that
    # lm-eval's arc_easy prompt has, so the built-in task appends it.
    arc = excerpt_arc()
    docs = []
    for d in arc:
        q = d["query"] + "\nAnswer:"
        docs.append(dict(requests=[(q, " " + c) for c in d["choices"]], norm_lens=[len(c) for c in d["choices"]], gold=d["gold"]))
    ref["arc_easy"] = h.multiple_choice(docs)

    # The same file read as a generic llm-foundry multiple_choice file: context = query as is.
    docs = []
    for d in arc:
        docs.append(dict(requests=[(d["query"], " " + c) for c in d["choices"]], norm_lens=[len(c) for c in d["choices"]], gold=d["gold"]))
    ref["mc_file"] = h.multiple_choice(docs)

    # llm-foundry schema: the continuation scored after each context option.
    (OUT / "schema_sample.jsonl").write_text("".join(json.dumps(x) + "\n" for x in SCHEMA_ITEMS), encoding="utf-8")
    docs = []
    for d in SCHEMA_ITEMS:
        cont = " " + d["continuation"]
        docs.append(dict(requests=[(c, cont) for c in d["context_options"]], norm_lens=[len(d["continuation"])] * len(d["context_options"]), gold=d["gold"]))
    ref["schema_file"] = h.multiple_choice(docs)

    for k in ["hellaswag", "piqa", "arc_easy", "mc_file", "schema_file"]:
        r = ref[k]
        trunc = sum(q["truncated"] for i in r["items"] for q in i["requests"])
        log(f"{k}: n {r['n']} acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} min top-2 gap {r['min_top2_gap']:.4f} truncated requests {trunc}")
        assert r["min_top2_gap"] > 5e-4, f"{k}: a near tie would make acc fragile; change SEED"

    # wikitext: sliding-window perplexity over the excerpt
    text = excerpt_wikitext()
    ids = h.enc(text)
    words = len(re.split(r"\s+", text))
    nbytes = len(text.encode("utf-8"))
    wk = dict(rows=WIKITEXT_ROWS, tokens=len(ids), words=words, bytes=nbytes, runs=[])
    for stride in WIKITEXT_STRIDES:
        r = sliding_window(model, ids, MAX_LEN, stride)
        nll = r["nll_sum"]
        r.update(
            token_perplexity=math.exp(nll / r["n_tokens"]),
            word_perplexity=math.exp(nll / words),
            byte_perplexity=math.exp(nll / nbytes),
            bits_per_byte=nll / nbytes / math.log(2),
        )
        wk["runs"].append(r)
        log(f"wikitext stride {stride}: {len(r['windows'])} windows, {r['n_tokens']} tokens, ppl {r['token_perplexity']:.2f}")
    ref["wikitext"] = wk

    (OUT / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for d in (OUT, MODEL_DIR) for p in d.rglob("*") if p.is_file())
    log(f"total size: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
