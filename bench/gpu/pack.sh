#!/usr/bin/env bash
# Build what bench/gpu/run.sh needs on the GPU machine and stage it, xz-compressed, in .gpu/
# (ignored through .git/info/exclude), to be carried with the device call: carry [".gpu"].
# Runs here, on a CPU machine: building with --features cuda needs no CUDA toolkit.
#
#   bash bench/gpu/pack.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
STAGE=.gpu
mkdir -p "$STAGE"
grep -qxF "/$STAGE/" .git/info/exclude 2>/dev/null || echo "/$STAGE/" >>.git/info/exclude

echo "==> cargo build --release -p opt-rs --features cuda"
cargo build --release -q -p opt-rs --features cuda
echo "==> cargo test --release -p opt-cuda --no-run"
# The test binaries' paths carry a hash; cargo's JSON messages name them.
cargo test --release -q -p opt-cuda --no-run --message-format=json >"$STAGE/build.json"
exe() {
    python3 - "$1" "$STAGE/build.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name \
            and m["target"]["kind"] == ["test"]:
        print(m["executable"])
PY
}
kernels=$(exe kernels)
model=$(exe model)
echo "==> cargo test --release -p opt-dist --features nccl --test nccl_gpu --no-run"
cargo test --release -q -p opt-dist --features nccl --test nccl_gpu --no-run --message-format=json >"$STAGE/build.json"
nccl=$(exe nccl_gpu)
[[ -n "$kernels" && -n "$model" && -n "$nccl" ]] || { echo "error: test binaries not found" >&2; exit 1; }
rm -f "$STAGE/build.json"

for pair in "target/release/opt-rs:opt-rs" "$kernels:opt-cuda-kernels" "$model:opt-cuda-model" "$nccl:opt-dist-nccl"; do
    src=${pair%%:*}
    dst=${pair##*:}
    echo "==> $src -> $STAGE/$dst.xz"
    xz -T2 -6 -c "$src" >"$STAGE/$dst.xz"
done
du -ch "$STAGE"/*.xz
echo "carry: [\"$STAGE\"]   command: bash bench/gpu/run.sh   (see bench/gpu/README.md)"
