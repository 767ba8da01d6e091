"""Load benchmark for `opt-rs serve`: N concurrent clients (default 1, 8, 32) send greedy
completion requests; reports generated tokens/s and p50/p99 request latency — against the same
requests run one by one through HF transformers `generate()` on the same machine.

    python3 bench/serve_load.py [--preset 125m] [--clients 1,8,32] [--prompt-len 32]
                                [--max-tokens 32] [--hf-python .venv-ref/bin/python]

Both sides use random weights of the preset (no hub), token-id prompts, greedy decoding with
`min_tokens = max_tokens` (EOS suppressed, so every request generates exactly max_tokens), f32
on the CPU. The server runs `opt-rs serve --random-preset PRESET`; the client side is the
standard library only (threads + http.client). Throughput = generated tokens / wall time of the
whole run; latency = one request, sent to answered. The HF side runs as a subprocess of
--hf-python (needs torch + transformers); `--hf-requests 0` skips it.
"""
import argparse
import http.client
import json
import os
import pathlib
import queue
import statistics
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = {"tiny": (2, 4, 64), "125m": (12, 12, 768), "350m": (24, 16, 1024), "1.3b": (24, 32, 2048)}


def prompt_ids(i, length):
    # BOS then deterministic ids in [4, 50000), as bench/generate.sh draws them.
    return [2] + [4 + (i * 7919 + j * 104729) % 49996 for j in range(length - 1)]


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


# ---------------------------------------------------------------------------------------------
# HF side (runs under --hf-python)
# ---------------------------------------------------------------------------------------------
def hf_worker(preset, n_requests, prompt_len, max_tokens, threads):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    L, H, D = SIZES[preset]
    kw = dict(num_hidden_layers=L, num_attention_heads=H, hidden_size=D, ffn_dim=4 * D, word_embed_proj_dim=D,
              dropout=0.0, attention_dropout=0.0)
    if preset == "350m":
        kw.update(word_embed_proj_dim=512, do_layer_norm_before=False)
    m = OPTForCausalLM(OPTConfig(**kw)).eval()
    lat = []
    with torch.no_grad():
        x = torch.tensor([prompt_ids(0, 8)])
        m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        for i in range(n_requests):
            x = torch.tensor([prompt_ids(i, prompt_len)])
            s = time.perf_counter()
            out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False)
            lat.append(time.perf_counter() - s)
            assert out.shape[1] == prompt_len + max_tokens
        wall = time.perf_counter() - start
    print(json.dumps(dict(sys="hf-generate-sequential", threads=torch.get_num_threads(), requests=n_requests,
                          tokens=n_requests * max_tokens, wall_s=wall, latencies=lat)))


# ---------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------
class ServerProc:
    def __init__(self, binary, preset, max_running):
        cmd = [binary, "serve", "--random-preset", preset, "--port", "0", "--max-running", str(max_running)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise SystemExit(f"server did not start: {line!r}")
        hostport = line.split("//")[-1].strip()
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)

    def post(self, body):
        c = http.client.HTTPConnection(self.host, self.port, timeout=600)
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {data[:300]!r}")
        return json.loads(data)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_clients(server, clients, n_requests, prompt_len, max_tokens):
    work = queue.Queue()
    for i in range(n_requests):
        work.put(i)
    lat, tokens, errors = [], [], []
    lock = threading.Lock()

    def client():
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            body = {"prompt": prompt_ids(i, prompt_len), "max_tokens": max_tokens, "min_tokens": max_tokens,
                    "temperature": 0}
            s = time.perf_counter()
            try:
                r = server.post(body)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))
                continue
            dt = time.perf_counter() - s
            with lock:
                lat.append(dt)
                tokens.append(r["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return dict(sys="opt-rs-serve", clients=clients, requests=n_requests, tokens=sum(tokens), wall_s=wall,
                latencies=lat)


def summary(r):
    return dict(sys=r["sys"], clients=r.get("clients", 1), requests=r["requests"], tokens=r["tokens"],
                wall_s=round(r["wall_s"], 2), tok_per_s=round(r["tokens"] / r["wall_s"], 1),
                p50_s=round(statistics.median(r["latencies"]), 3), p99_s=round(percentile(r["latencies"], 99), 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(4, 2 × clients))")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "opt-rs"))
    ap.add_argument("--hf-python", default=str(ROOT / ".venv-ref" / "bin" / "python"))
    ap.add_argument("--hf-requests", type=int, default=16, help="requests run one by one through HF (0 = skip)")
    ap.add_argument("--hf-threads", type=int, default=0,
                    help="torch threads for HF (0 = torch's default, all cores); on a busy machine 1 can be faster")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_worker:
        hf_worker(a.preset, a.hf_requests, a.prompt_len, a.max_tokens, a.hf_threads)
        return
    levels = [int(x) for x in a.clients.split(",")]
    rows = []
    server = ServerProc(a.bin, a.preset, max(64, max(levels)))
    try:
        server.post({"prompt": prompt_ids(0, 8), "max_tokens": 4, "temperature": 0})  # warm-up
        for n in levels:
            r = run_clients(server, n, a.requests or max(4, 2 * n), a.prompt_len, a.max_tokens)
            rows.append(summary(r))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    hf = None
    if a.hf_requests > 0:
        if not os.path.exists(a.hf_python):
            print(f"(no {a.hf_python}: HF not measured)")
        else:
            out = subprocess.run([a.hf_python, __file__, "--hf-worker", "--preset", a.preset, "--hf-requests",
                                  str(a.hf_requests), "--prompt-len", str(a.prompt_len), "--max-tokens",
                                  str(a.max_tokens), "--hf-threads", str(a.hf_threads)],
                                 capture_output=True, text=True, check=True)
            raw = json.loads(out.stdout.strip().splitlines()[-1])
            hf = summary(raw)
            hf["sys"] += f" ({raw['threads']} thr)"
            print(json.dumps(hf), flush=True)
    print(f"\n{a.preset}, prompt {a.prompt_len} tokens, {a.max_tokens} new tokens per request, greedy, f32, "
          f"{os.cpu_count()} CPUs")
    print(f"{'system':<32} {'clients':>7} {'reqs':>5} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7}  vs HF")
    for r in rows + ([hf] if hf else []):
        ratio = f"{r['tok_per_s'] / hf['tok_per_s']:.2f}x" if hf else "-"
        print(f"{r['sys']:<32} {r['clients']:>7} {r['requests']:>5} {r['tok_per_s']:>8.1f} {r['p50_s']:>7.3f} "
              f"{r['p99_s']:>7.3f}  {ratio}")


if __name__ == "__main__":
    sys.exit(main())
