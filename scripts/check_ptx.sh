#!/usr/bin/env bash
# Compile every CUDA kernel of opt-cuda to PTX and sm_90 machine code with NVRTC, on a machine
# without a GPU or CUDA toolkit. NVRTC comes from PyPI's `nvidia-cuda-nvrtc` wheel (13.0.x, the
# CUDA version of the GPU machines), installed once into a virtual environment; the test
# `crates/opt-cuda/tests/ptx.rs` then dlopens it (through LD_LIBRARY_PATH) and fails on any
# compile error, missing entry point, or missing NVRTC (OPT_CUDA_REQUIRE_NVRTC=1).
#
#   bash scripts/check_ptx.sh            # from the repository root or anywhere
#
# Environment:
#   OPT_NVRTC_VENV   where the venv lives (default: <repo>/.venv-nvrtc, ignored by git)
#   OPT_NVRTC_WHEEL  the pip requirement (default: nvidia-cuda-nvrtc==13.0.88)
#   OPT_CUDA_PTX_DIR if set, the PTX and ptxas register/spill reports are written there
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${OPT_NVRTC_VENV:-$ROOT/.venv-nvrtc}"
WHEEL="${OPT_NVRTC_WHEEL:-nvidia-cuda-nvrtc==13.0.88}"

find_lib() {
    # The wheel puts libnvrtc.so.13 under site-packages/nvidia/cu13/lib.
    [[ -d "$VENV" ]] || return 0
    find "$VENV" -name 'libnvrtc.so.13' -path '*nvidia*' 2>/dev/null | head -n 1 || true
}

LIB="$(find_lib)"
if [[ -z "$LIB" ]]; then
    echo "==> installing $WHEEL into $VENV"
    if python3 -m venv "$VENV" 2>/dev/null; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$WHEEL"
    else
        # No venv module (Debian without python3-venv): a plain target folder works as well.
        rm -rf "$VENV"
        python3 -m pip install --quiet --disable-pip-version-check --target "$VENV" "$WHEEL"
    fi
    LIB="$(find_lib)"
    [[ -n "$LIB" ]] || {
        echo "error: $WHEEL installed but libnvrtc.so.13 not found under $VENV" >&2
        exit 1
    }
fi
LIBDIR="$(dirname "$LIB")"
echo "==> NVRTC: $LIB"

LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" OPT_CUDA_REQUIRE_NVRTC=1 \
    cargo test --release -p opt-cuda --test ptx -- --nocapture
