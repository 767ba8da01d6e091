#!/usr/bin/env bash
# The one script for a GPU session (run by the device tool in the repository root, with the
# binaries staged by bench/gpu/pack.sh carried in .gpu/). In order, each step bounded by its own
# timeout and by a global deadline so the call ends well inside the device time:
#   1. the GPU and driver;
#   2. every CUDA kernel against its CPU twin (opt-cuda's tests/kernels.rs, prebuilt);
#   3. the whole model on CUDA against CPU: logits, KV-cache decoding, a training step;
#   4. the two ceilings of this card, measured now: device copy bandwidth and bf16 matmul rate;
#   5. the issue's table for opt-rs and PyTorch (shared/anchors/hf_gpu_baseline.py, copied here)
#      in the same call: decode 125m/1.3b batch 1, generate 125m batch 32 (128 + 128),
#      train 125m/1.3b at 8 x 2048;
#   6. 20 training steps on CPU and CUDA in f32: the loss curves side by side;
#   7. the table with opt-rs/PyTorch ratios and what bounds each figure (bench/gpu/report.py).
# Everything lands in $OUT (results.jsonl, one log per step); the table is printed last.
#
#   bash bench/gpu/run.sh [DEADLINE_S]      # default 420 s for the whole script
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DEADLINE=${1:-420}
# "quick": correctness, opt-rs figures and profiles only (no PyTorch peer, no ceilings): for a
# check between changes; the table with ratios needs the full run.
MODE=${2:-full}
OUT=${OUT:-/tmp/opt-rs-gpu}
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
: >"$RES"
START=$SECONDS
export PYTHONUNBUFFERED=1
# The GPU machines keep the CUDA 13 libraries (cuBLAS, NVRTC) here; the driver is on the
# default path.
export LD_LIBRARY_PATH="/usr/local/cuda-13/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# ... and the driver's folder, in case the loader's cache does not list it.
[[ -d /usr/local/nvidia/lib64 ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/usr/local/nvidia/lib64"
BIN=$(mktemp -d)
export XDG_CACHE_HOME="$BIN/cache" # compiled kernels: a fresh cache, so start-up compile is timed too

note() { printf '{"task": "%s", "status": "%s", "s": %s}\n' "$1" "$2" "$3" >>"$RES"; }

# step NAME TIMEOUT CMD... : run with a timeout capped by the deadline; JSON lines the command
# prints go to results.jsonl, everything to $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - (SECONDS - START)))
    if ((left < 15)); then
        echo "== $name: skipped (deadline)"
        note "$name" skipped 0
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    grep -h '^{' "$OUT/$name.log" >>"$RES"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
    local status=ok
    ((rc == 124 || rc == 137)) && status=timeout
    ((rc != 0 && rc != 124 && rc != 137)) && status="failed($rc)"
    note "$name" "$status" $((SECONDS - t0))
}

# ---- 0. unpack -------------------------------------------------------------------------------
for f in .gpu/*.xz; do
    [[ -f "$f" ]] || { echo "error: no .gpu/*.xz: run bench/gpu/pack.sh here first and carry .gpu" >&2; exit 1; }
    xz -dc "$f" >"$BIN/$(basename "$f" .xz)"
    chmod +x "$BIN/$(basename "$f" .xz)"
done
OPT="$BIN/opt-rs"

# ---- 1. machine ------------------------------------------------------------------------------
step gpu 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# ---- 2-3. correctness ------------------------------------------------------------------------
export RUST_BACKTRACE=1
step kernels 100 "$BIN/opt-cuda-kernels" --ignored --test-threads=1
step model 60 "$BIN/opt-cuda-model" --ignored --test-threads=1
# NCCL: the image's PyTorch ships libnccl (nvidia-nccl wheel); cudarc opens it at run time.
NCCL_DIR=$(dirname "$(find /opt /usr -name 'libnccl.so*' 2>/dev/null | head -n 1)" 2>/dev/null)
[[ -n "$NCCL_DIR" && -d "$NCCL_DIR" ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$NCCL_DIR"
[[ $MODE == full ]] && step nccl 60 "$BIN/opt-dist-nccl" --ignored --test-threads=1 --nocapture
step score_parity 60 python3 bench/gpu/score_parity.py "$OPT"

# ---- 4. the table, opt-rs first (bf16 weights / bf16 GEMMs with f32 master weights) ----------
step ors_train_125m 60 "$OPT" bench --device cuda --preset 125m --dtype bf16 --what train --batch 8 --seq 2048 --steps 5
step ors_decode_125m 40 "$OPT" bench --device cuda --preset 125m --dtype bf16 --what decode --batch 1 --prompt 128 --new-tokens 128 --reps 2
step ors_generate_125m_b32 40 "$OPT" bench --device cuda --preset 125m --dtype bf16 --what decode --batch 32 --prompt 128 --new-tokens 128 --reps 2
step ors_decode_1.3b 60 "$OPT" bench --device cuda --preset 1.3b --dtype bf16 --what decode --batch 1 --prompt 128 --new-tokens 128 --reps 2
# 8 x 2048 does not fit 1.3b while attention keeps its probabilities (24 x 4.3 GB f32);
# with activation recomputation only one layer's activations are kept (about 10 GB).
step ors_train_1.3b_b2 60 "$OPT" bench --device cuda --preset 1.3b --dtype bf16 --what train --batch 2 --seq 2048 --steps 3
[[ $MODE == full ]] && step ors_train_1.3b_b8_recompute 90 "$OPT" bench --device cuda --preset 1.3b --dtype bf16 --what train --batch 8 --seq 2048 --steps 3 --recompute
# where the time goes: every operation synchronised and timed (slower than the runs above)
step prof_train_125m 40 env OPT_RS_CUDA_PROFILE=1 "$OPT" bench --device cuda --preset 125m --dtype bf16 --what train --batch 8 --seq 2048 --steps 1
step prof_decode_125m 40 env OPT_RS_CUDA_PROFILE=1 "$OPT" bench --device cuda --preset 125m --dtype bf16 --what decode --batch 1 --prompt 128 --new-tokens 64 --reps 2
step prof_generate_125m_b32 40 env OPT_RS_CUDA_PROFILE=1 "$OPT" bench --device cuda --preset 125m --dtype bf16 --what decode --batch 32 --prompt 128 --new-tokens 32 --reps 2

# ---- 5. the ceilings and the PyTorch peer, same call ---------------------------------------
if [[ $MODE == full ]]; then
    step ceilings 40 python3 bench/gpu/ceilings.py
    step hf_generate 120 python3 bench/gpu/hf_gpu_baseline.py gen:125m gen:1.3b
    step hf_train 90 python3 bench/gpu/hf_gpu_baseline.py train:125m train:1.3b
fi

# ---- 6. loss curves, CPU against CUDA, f32 -------------------------------------------------
for dev in cpu cuda; do
    step "train_parity_$dev" 60 "$OPT" train --device "$dev" --fresh \
        --set train.max_steps=20 --set run.log_every=1 --set train.precision=f32 \
        --set run.dir="$OUT/train-$dev"
done
# ... and in bf16 mixed precision (CPU: bf16-rounded weights and gradients; CUDA: bf16 products)
for dev in cpu cuda; do
    step "train_bf16_$dev" 60 "$OPT" train --device "$dev" --fresh \
        --set train.max_steps=20 --set run.log_every=1 --set train.precision=bf16 \
        --set run.dir="$OUT/train-bf16-$dev"
done

# ---- 7. table --------------------------------------------------------------------------------
for p in prof_train_125m prof_decode_125m prof_generate_125m_b32; do
    echo "== $p"
    sed -n '/CUDA profile/,$p' "$OUT/$p.log" | head -n 24
done
grep -h '"score_parity"\|^step \|test result' "$OUT/score_parity.log" "$OUT/nccl.log" 2>/dev/null
python3 bench/gpu/report.py "$RES" "$OUT" | tee "$OUT/table.txt"
echo "total $((SECONDS - START)) s; results in $OUT"
# The device tool brings back at most 8 files: pack the logs and run folders into one.
(cd "$OUT" && rm -rf train-*/checkpoints && tar czf logs.tgz -- *.log train-* 2>/dev/null && rm -rf -- *.log train-*)
