"""The two ceilings of the card, measured in the same call as the benchmarks (METHOD.md):
device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate, both through
PyTorch on random data, medians of CUDA-event timings after warm-up. One JSON line each."""
import json
import torch

dev = "cuda"


def median_ms(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


n = 1 << 30  # 1 Gi floats = 4 GiB: far larger than L2
src = torch.randn(n, device=dev)
dst = torch.empty_like(src)
ms = median_ms(lambda: dst.copy_(src))
print(json.dumps(dict(task="ceiling_copy", gb_per_s=round(2 * 4 * n / ms / 1e6, 1))), flush=True)
del src, dst
torch.cuda.empty_cache()

a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
b = torch.randn_like(a)
ms = median_ms(lambda: a @ b)
print(json.dumps(dict(task="ceiling_matmul_bf16", tflops=round(2 * 8192**3 / ms / 1e9, 1))), flush=True)
a32, b32 = a.float(), b.float()
torch.backends.cuda.matmul.allow_tf32 = False
ms = median_ms(lambda: a32 @ b32, reps=5)
print(json.dumps(dict(task="ceiling_matmul_f32", tflops=round(2 * 8192**3 / ms / 1e9, 1))), flush=True)
