#!/usr/bin/env bash
# Distributed parity under mpirun (OpenMPI, CPU): tp=2, fsdp=2, tp=2×fsdp=2 training vs the
# PyTorch fixture (fsdp with the slice kept gathered and with ZeRO-3 layer streaming), tensor-parallel greedy generation, tp=2 checkpoint reload + reshard to tp=1,
# and a dead rank ending the job instead of hanging. Then the real `opt-rs train` under
# `mpirun -np N` (and a torchrun-style TCP launch) with [parallel] tp / fsdp / dp: per-step
# losses equal the one-process run's within 1e-4 with clipping on, a sharded run resumes
# exactly, `opt-rs checkpoint reshard` to one process resumes, and bad layouts are clear errors;
# `opt-rs generate --tp 2` under mpirun prints the one-process greedy output.
# The same checks also run in-process (ranks as threads over TCP) in `cargo test -p opt-dist`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; then
    echo "dist_tests: installing OpenMPI (openmpi-bin libopenmpi-dev)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev
fi

cargo build --release -p opt-dist --features mpi --example dist_check
BIN="${CARGO_TARGET_DIR:-target}/release/examples/dist_check"
MPI=(mpirun --allow-run-as-root --oversubscribe)
# OpenMPI's shared-memory transport needs room in /dev/shm; CI containers are small.
export OMPI_MCA_btl_vader_single_copy_mechanism=none

"${MPI[@]}" -np 2 "$BIN" train 2 1 1
"${MPI[@]}" -np 2 "$BIN" train 1 2 1
"${MPI[@]}" -np 4 "$BIN" train 2 2 1
"${MPI[@]}" -np 2 "$BIN" train 1 2 1 zero3
"${MPI[@]}" -np 4 "$BIN" train 2 2 1 zero3
"${MPI[@]}" -np 2 "$BIN" train 1 1 2
"${MPI[@]}" -np 2 "$BIN" generate
CK=$(mktemp -d)
trap 'rm -rf "$CK"' EXIT
"${MPI[@]}" -np 2 "$BIN" checkpoint "$CK"

# A dead rank: mpirun must end the job with an error within the bound (not hang).
start=$(date +%s)
set +e
timeout 60 "${MPI[@]}" -np 2 "$BIN" die >/dev/null 2>&1
rc=$?
set -e
if [ "$rc" -eq 0 ]; then
    echo "dist_tests: a job with a dead rank exited successfully" >&2
    exit 1
fi
if [ "$rc" -eq 124 ]; then
    echo "dist_tests: a job with a dead rank hung for 60 s" >&2
    exit 1
fi
echo "dead rank: job ended with status $rc after $(( $(date +%s) - start )) s"

# --- opt-rs train, sharded -------------------------------------------------------------------
cargo build --release -p opt-rs --features mpi
OPT="${CARGO_TARGET_DIR:-target}/release/opt-rs"
W="$CK/train"
mkdir -p "$W"
# 32 rows of 17 ids below the fixture's 512-token vocabulary (a small exact LCG).
awk 'BEGIN { x = 12345; for (r = 0; r < 32; r++) { printf "{\"ids\": [2"
      for (i = 0; i < 16; i++) { x = (x * 75 + 74) % 65537; printf ", %d", 4 + x % 500 }
      print "]}" } }' >"$W/train.jsonl"
SETS=(--set model.init_from=fixtures/pre_ln --set model.dropout=0.0 --set model.attention_dropout=0.0
      --set "data.train=$W/train.jsonl" --set 'data.valid=""' --set data.seq_len=16
      --set optim.lr=3e-3 --set optim.clip_norm=0.5 --set schedule.warmup_steps=2 --set schedule.total_steps=6
      --set train.batch_size=4 --set guards.enabled=false --set run.log_every=1 --set run.checkpoint_every=2
      --set run.keep_last=10 --set run.eval_every=0 --set run.eval_batches=0 --set 'sample.prompts=[]')
train() { # train RUN_DIR NP [opt-rs train args...]
    local dir=$1 np=$2
    shift 2
    if [ "$np" -eq 1 ]; then
        "$OPT" train "${SETS[@]}" --set "run.dir=$W/$dir" "$@" >"$W/$dir.out" 2>&1
    else
        "${MPI[@]}" -np "$np" "$OPT" train "${SETS[@]}" --set "run.dir=$W/$dir" "$@" >"$W/$dir.out" 2>&1
    fi || { cat "$W/$dir.out" >&2; echo "dist_tests: opt-rs train ($dir) failed" >&2; exit 1; }
}
losses() { grep '"kind":"train"' "$W/$1/logbook.jsonl" | sed -E 's/.*"loss":([^,}]*).*/\1/'; }
norms() { grep '"kind":"train"' "$W/$1/logbook.jsonl" | sed -E 's/.*"grad_norm":([^,}]*).*/\1/'; }
# compare NAME A B [skip]: the losses of run A (from its step skip+1) and of run B, within 1e-4.
compare() {
    local name=$1 a=$2 b=$3 skip=${4:-0}
    paste <(losses "$a" | tail -n +$((skip + 1))) <(losses "$b") | awk -v name="$name" '
        { d = $1 - $2; if (d < 0) d = -d; if (d > m) m = d; n++ }
        END { if (n == 0) { print name ": no losses" > "/dev/stderr"; exit 1 }
              if (m > 1e-4) { printf "%s: losses differ by %g\n", name, m > "/dev/stderr"; exit 1 }
              printf "%s: %d losses within %.2e of the reference\n", name, n, m }'
}

train one 1 --set train.max_steps=4
norms one | awk '$1 <= 0.5 { print "dist_tests: clipping never acted (grad norm " $1 ")" > "/dev/stderr"; exit 1 }'
train tp2 2 --set train.max_steps=4 --set parallel.tp=2
compare "mpirun -np 2 opt-rs train, tp=2" one tp2
train fsdp2 2 --set train.max_steps=4 --set parallel.fsdp=2
compare "mpirun -np 2 opt-rs train, fsdp=2" one fsdp2
train dp2 2 --set train.max_steps=4 --set parallel.dp=2
compare "mpirun -np 2 opt-rs train, dp=2" one dp2
train tp2fsdp2 4 --set train.max_steps=4 --set parallel.tp=2 --set parallel.fsdp=2
compare "mpirun -np 4 opt-rs train, tp=2 × fsdp=2 (ZeRO-3, layers gathered one at a time)" one tp2fsdp2
train zero2 4 --set train.max_steps=4 --set parallel.tp=2 --set parallel.fsdp=2 --set parallel.reshard_after_forward=false
compare "mpirun -np 4 opt-rs train, tp=2 × fsdp=2, reshard_after_forward=false (ZeRO-2)" one zero2

# torchrun-style launch (TCP rendezvous, no MPI): fsdp=2.
PORT=$((29500 + RANDOM % 1000))
for r in 1 0; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
        "$OPT" train "${SETS[@]}" --set "run.dir=$W/tcp" --set train.max_steps=4 --set parallel.fsdp=2 \
        >"$W/tcp.$r.out" 2>&1 &
done
wait || { cat "$W"/tcp.*.out >&2; echo "dist_tests: torchrun-style launch failed" >&2; exit 1; }
compare "RANK/WORLD_SIZE launch, fsdp=2" one tcp

# Resume at the same layout: 2 steps, then --resume to 4, equals the uninterrupted run exactly.
train resumed 4 --set train.max_steps=2 --set parallel.tp=2 --set parallel.fsdp=2
train resumed 4 --set train.max_steps=4 --set parallel.tp=2 --set parallel.fsdp=2 --resume
if [ "$(losses resumed)" != "$(losses tp2fsdp2)" ]; then
    echo "dist_tests: tp=2 × fsdp=2: 2 steps + --resume differ from 4 uninterrupted steps" >&2
    paste <(losses resumed) <(losses tp2fsdp2) >&2
    exit 1
fi
echo "tp=2 × fsdp=2: 2 steps + --resume to 4 equal the uninterrupted run exactly"

# Reshard the tp=2 × fsdp=2 step-2 checkpoint to one process; it resumes and continues the run.
mkdir -p "$W/onefrom4/checkpoints"
"$OPT" checkpoint reshard "$W/tp2fsdp2/checkpoints/step_0000002" "$W/onefrom4/checkpoints/step_0000002" --tp 1 --fsdp 1
train onefrom4 1 --set train.max_steps=4 --resume
compare "tp=2 × fsdp=2 checkpoint resharded to one process, resumed" tp2fsdp2 onefrom4 2

# `opt-rs export` of the sharded step-2 checkpoint (consolidated tensor by tensor) writes the
# same HF weights as exporting its one-process reshard.
"$OPT" export --run "$W/tp2fsdp2" --step 2 --out "$W/hf-sharded" >/dev/null
"$OPT" export --run "$W/onefrom4" --step 2 --out "$W/hf-one" >/dev/null
cmp "$W/hf-sharded/model.safetensors" "$W/hf-one/model.safetensors" ||
    { echo "dist_tests: export of a sharded checkpoint differs from its one-process reshard" >&2; exit 1; }
echo "opt-rs export of the tp=2 × fsdp=2 checkpoint equals the export of its one-process reshard"
# `--model` accepts the sharded checkpoint folder itself.
"$OPT" score --model "$W/tp2fsdp2/checkpoints/step_0000002" --ids 2,5,9,7 --json >"$W/score-sharded.json" 2>/dev/null
"$OPT" score --model "$W/hf-sharded" --ids 2,5,9,7 --json >"$W/score-hf.json"
cmp "$W/score-sharded.json" "$W/score-hf.json" ||
    { echo "dist_tests: scoring the sharded checkpoint differs from scoring its export" >&2; exit 1; }
echo "opt-rs score --model on the sharded checkpoint equals scoring its export"

# Tensor-parallel inference: `mpirun -np 2 opt-rs generate --tp 2` prints the one-process output.
GEN=(generate --model fixtures/pre_ln --ids 2,5,9 --ids 2,7 --max-new-tokens 16 --greedy --json)
"$OPT" "${GEN[@]}" >"$W/gen1.out"
"${MPI[@]}" -np 2 "$OPT" "${GEN[@]}" --tp 2 >"$W/gen2.out" 2>"$W/gen2.err" ||
    { cat "$W/gen2.err" >&2; echo "dist_tests: mpirun opt-rs generate --tp 2 failed" >&2; exit 1; }
if ! diff "$W/gen1.out" "$W/gen2.out" >&2; then
    echo "dist_tests: tp=2 greedy generation differs from one process" >&2
    exit 1
fi
echo "mpirun -np 2 opt-rs generate --tp 2: $(wc -l <"$W/gen2.out") prompts, same greedy ids as one process"

# Bad layouts: clear errors naming the key.
expect_error() { # expect_error TEXT command...
    local text=$1
    shift
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
    if [ "$rc" -eq 0 ] || ! grep -q -- "$text" <<<"$out"; then
        echo "dist_tests: expected an error mentioning '$text' from: $*" >&2
        echo "$out" >&2
        exit 1
    fi
    echo "refused as expected: $(grep -m1 -- "$text" <<<"$out")"
}
expect_error "parallel.tp" "$OPT" train "${SETS[@]}" --set "run.dir=$W/bad1" --set parallel.tp=2
expect_error "parallel.tp" "${MPI[@]}" -np 2 "$OPT" train "${SETS[@]}" --set "run.dir=$W/bad2" --set parallel.tp=4
expect_error "--tp 3: 4 attention heads" "${MPI[@]}" -np 3 "$OPT" generate --model fixtures/pre_ln --ids 2,5 --tp 3
expect_error "attention heads" "${MPI[@]}" -np 3 "$OPT" train "${SETS[@]}" --set "run.dir=$W/bad3" \
    --set parallel.tp=3 --set train.batch_size=3
echo "dist_tests: all distributed checks passed"
