"""HF transformers `generate()` decode speed on random OPT weights (no hub), the peer of
`opt-rs generate` in bench/generate.sh. Prints one JSON line per batch size.

    .venv-ref/bin/python bench/hf_generate.py [PRESET] [PROMPT_LEN] [NEW_TOKENS] [BATCH...]
"""
import json, sys, time, torch
from transformers import OPTConfig, OPTForCausalLM

SIZES = {"tiny": (2, 4, 64), "125m": (12, 12, 768), "350m": (24, 16, 1024), "1.3b": (24, 32, 2048)}
name = sys.argv[1] if len(sys.argv) > 1 else "125m"
prompt_len = int(sys.argv[2]) if len(sys.argv) > 2 else 128
new = int(sys.argv[3]) if len(sys.argv) > 3 else 128
batches = [int(b) for b in sys.argv[4:]] or [1, 16]
torch.manual_seed(0)
L, H, D = SIZES[name]
kw = dict(num_hidden_layers=L, num_attention_heads=H, hidden_size=D, ffn_dim=4 * D, word_embed_proj_dim=D,
          dropout=0.0, attention_dropout=0.0)
if name == "350m":
    kw.update(word_embed_proj_dim=512, do_layer_norm_before=False)
m = OPTForCausalLM(OPTConfig(**kw)).eval()
with torch.no_grad():
    # Warm-up (allocator, kernels) on a short run.
    m.generate(torch.randint(4, 50000, (1, 8)), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for b in batches:
        x = torch.randint(4, 50000, (b, prompt_len))
        s = time.perf_counter()
        out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False)
        dt = time.perf_counter() - s
        assert out.shape == (b, prompt_len + new), out.shape
        print(json.dumps(dict(sys="hf-torch-cpu", task=f"generate b{b} {prompt_len}+{new}", model=name, batch=b,
                              threads=torch.get_num_threads(), s=round(dt, 2), new_tok_per_s=round(b * new / dt, 1))), flush=True)
