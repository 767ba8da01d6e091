#!/usr/bin/env bash
# Distributed parity under mpirun (OpenMPI, CPU): tp=2, fsdp=2, tp=2×fsdp=2 training vs the
# PyTorch fixture, tensor-parallel greedy generation, tp=2 checkpoint reload + reshard to tp=1,
# and a dead rank ending the job instead of hanging. The same checks also run in-process (ranks
# as threads over TCP) in `cargo test -p opt-dist`.
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
echo "dist_tests: all distributed checks passed"
