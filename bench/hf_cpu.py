# Vendored from shared/anchors/hf_cpu_baseline.py (the script that measured the PyTorch figures in the issues).
"""PyTorch/HF transformers OPT on this CPU: the peer each CPU figure is held against.
Random weights with real shapes (no hub). Prints JSON lines."""
import json, sys, time, torch
from transformers import OPTConfig, OPTForCausalLM
torch.manual_seed(0)
SIZES = {"125m": (12, 12, 768), "350m": (24, 16, 1024), "1.3b": (24, 32, 2048)}
name = sys.argv[1] if len(sys.argv) > 1 else "125m"
what = sys.argv[2:] or ["prefill", "decode", "train"]
L, H, D = SIZES[name]
kw = dict(num_hidden_layers=L, num_attention_heads=H, hidden_size=D, ffn_dim=4 * D, word_embed_proj_dim=D,
          dropout=0.0, attention_dropout=0.0)
if name == "350m": kw.update(word_embed_proj_dim=512, do_layer_norm_before=False)
m = OPTForCausalLM(OPTConfig(**kw)).eval()
def t(fn, n):
    fn(); s = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - s) / n
with torch.no_grad():
    if "prefill" in what:
        x = torch.randint(4, 50000, (1, 128))
        dt = t(lambda: m(input_ids=x), 5)
        print(json.dumps(dict(sys="hf-torch-cpu", task="prefill", model=name, tokens=128, ms=round(dt * 1e3, 1), tok_per_s=round(128 / dt, 1))))
    if "decode" in what:
        x = torch.randint(4, 50000, (1, 16))
        dt = t(lambda: m.generate(x, max_new_tokens=64, min_new_tokens=64, do_sample=False), 2)
        print(json.dumps(dict(sys="hf-torch-cpu", task="generate16+64", model=name, s=round(dt, 2), new_tok_per_s=round(64 / dt, 1))))
if "train" in what:
    m.train(); opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(4, 50000, (4, 128))
    def step():
        loss = m(input_ids=x, labels=x).loss; loss.backward(); opt.step(); opt.zero_grad()
    dt = t(step, 3)
    print(json.dumps(dict(sys="hf-torch-cpu", task="train4x128", model=name, step_s=round(dt, 2), tok_per_s=round(512 / dt, 1))))
