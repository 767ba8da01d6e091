"""`opt-rs score --device cuda` against `--device cpu` on a fixture model (the issue's acceptance:
equal within 1e-4 in f32 and within bf16 tolerance with bf16 weights). Prints one JSON line per
dtype and exits non-zero when a bound is missed.

    python3 bench/gpu/score_parity.py OPT_RS_BINARY"""
import json
import subprocess
import sys

opt = sys.argv[1]
model = "fixtures/pre_ln"
ids = "2,31,232,328,4,143,233,9,5,142,16,10,186,129,6,8,43,10,367,5,7,11,100,4,2"


def score(device, dtype):
    out = subprocess.run([opt, "score", "--device", device, "--model", model, "--ids", ids, "--dtype", dtype,
                          "--top-logprobs", "3", "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


bad = False
for dtype, tol in (("f32", 1e-4), ("bf16", 5e-2)):
    c, g = score("cpu", dtype), score("cuda", dtype)
    pairs = [(a, b) for a, b in zip(c["token_logprobs"], g["token_logprobs"]) if a is not None]
    worst = max(abs(a - b) for a, b in pairs)
    ok = worst <= tol and c["tokens"] == g["tokens"]
    bad |= not ok
    print(json.dumps(dict(task="score_parity", dtype=dtype, positions=len(pairs), max_abs_diff_logprob=worst,
                          ppl_cpu=c["perplexity"], ppl_cuda=g["perplexity"], tol=tol, ok=ok)), flush=True)
sys.exit(1 if bad else 0)
