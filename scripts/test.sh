#!/usr/bin/env bash
# opt-rs test entry point: `bash scripts/test.sh` (CI runs it through .ci/run with CI=true).
#
# Works on a fresh Debian machine with a Rust toolchain: it installs what the tests need when
# missing, then runs, failing fast:
#   1. cargo fmt --all -- --check
#   2. cargo clippy --workspace --all-targets -- -D warnings
#   3. cargo test --workspace --release
# and prints a summary whose last line is "tests: N passed, N failed[, N skipped]".
#
# Environment:
#   CI=true               no colours, no progress bars (set by CI).
#   OPT_TEST_SKIP_SETUP=1 skip the install steps (offline machine that already has everything).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Output goes through tee, so tools never see a terminal; colour only if ours is one.
RUSTFMT_COLOR=never
[[ -t 1 ]] && RUSTFMT_COLOR=always
if [[ "${CI:-}" == "true" ]]; then
    export CARGO_TERM_COLOR=never
    export CARGO_TERM_PROGRESS_WHEN=never
    RUSTFMT_COLOR=never
fi
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/opt-rs-test.XXXXXX")"
STEP_NAMES=()
STEP_RESULTS=()
CURRENT_STEP=""
SCRIPT_START=$SECONDS

log() { printf '==> %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# ---------------------------------------------------------------------------------------------
# Setup: each ensure_* installs what is missing and is a no-op when all is there.
# ---------------------------------------------------------------------------------------------

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck disable=SC1091
        source "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
    log "$(cargo --version)"
}

# rustfmt and clippy come as rustup components.
ensure_rust_components() {
    local component
    if ! cargo fmt --version >/dev/null 2>&1; then
        component=rustfmt
        log "installing rust component $component"
        command -v rustup >/dev/null 2>&1 || die "cargo fmt missing and no rustup to add $component"
        rustup component add "$component"
    fi
    if ! cargo clippy --version >/dev/null 2>&1; then
        component=clippy
        log "installing rust component $component"
        command -v rustup >/dev/null 2>&1 || die "cargo clippy missing and no rustup to add $component"
        rustup component add "$component"
    fi
}

# HOOK: Debian packages the tests need. Later issues add e.g. openmpi (multi-process tests) and
# chromium (web client tests) here: append the package names to DEBIAN_PACKAGES.
DEBIAN_PACKAGES=(
)

ensure_debian_packages() {
    ((${#DEBIAN_PACKAGES[@]} > 0)) || return 0
    local missing=() pkg
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    ((${#missing[@]} > 0)) || return 0
    command -v apt-get >/dev/null 2>&1 || die "missing Debian packages (${missing[*]}) and no apt-get"
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
}

# HOOK: Python virtual environment for the client tests (none yet). When they arrive: create
# "$ROOT/.venv-client" (ignored by git via /.venv*) with `python3 -m venv`, pip install the
# pinned requirements into it, and export its path for the tests. No-op for now.
ensure_client_venv() {
    return 0
}

# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

# run_step NAME CMD...: runs CMD, records its time and result; output is also kept in LOG_DIR.
run_step() {
    local name=$1
    shift
    CURRENT_STEP=$name
    local start=$SECONDS
    log "$name: $*"
    "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    STEP_NAMES+=("$name")
    STEP_RESULTS+=("ok   $((SECONDS - start))s")
    CURRENT_STEP=""
}

# Adds up cargo's "test result:" lines (one per test binary and doc-test run).
TEST_TOTALS=""
count_tests() {
    local file=$1
    [[ -f "$file" ]] || return 0
    TEST_TOTALS=$(awk '
        /^test result: / {
            for (i = 1; i <= NF; i++) {
                v = $(i - 1) + 0
                if ($i ~ /^passed/) p += v
                if ($i ~ /^failed/) f += v
                if ($i ~ /^ignored/) s += v
            }
            runs++
        }
        END { printf "%d %d %d %d", p, f, s, runs }
    ' "$file")
}

summary() {
    local rc=$?
    set +e
    if [[ -n "$CURRENT_STEP" ]]; then
        STEP_NAMES+=("$CURRENT_STEP")
        STEP_RESULTS+=("FAIL")
    fi
    cat "$LOG_DIR/test.log" "$LOG_DIR/clients.log" >"$LOG_DIR/all-tests.log" 2>/dev/null || true
    count_tests "$LOG_DIR/all-tests.log"
    echo
    echo "==================== opt-rs test summary ===================="
    local i passed=0 failed=0 ignored=0 runs=0
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-8s %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}"
    done
    printf '  total    %ss (logs: %s)\n' "$((SECONDS - SCRIPT_START))" "$LOG_DIR"
    if [[ -n "$TEST_TOTALS" ]]; then
        read -r passed failed ignored runs <<<"$TEST_TOTALS"
    fi
    if ((runs > 0)); then
        echo "  ($runs test binaries and doc-test runs)"
        ((rc == 0)) || echo "  FAILED (exit $rc)"
        echo "tests: $passed passed, $failed failed, $ignored skipped"
    elif ((rc != 0)); then
        echo "FAILED before any test ran (exit $rc)"
    fi
    exit "$rc"
}
trap summary EXIT

if [[ "${OPT_TEST_SKIP_SETUP:-}" != "1" ]]; then
    ensure_rust
    ensure_rust_components
    ensure_debian_packages
    ensure_client_venv
else
    ensure_rust
fi

# --release: the numeric tests run much faster optimised, and the build itself is faster too:
# from clean on 2 cores, `cargo test --workspace --release` took 213 s against 424 s for the
# debug-profile `cargo test --workspace` (the debug build carries debuginfo through everything).
run_step fmt cargo fmt --all -- --check --color "$RUSTFMT_COLOR"
run_step clippy cargo clippy --workspace --all-targets -- -D warnings
run_step test cargo test --workspace --release
# The server driven by real clients: the `openai` Python package and headless Chromium on the
# playground (the script installs chromium and a venv when missing).
run_step clients bash scripts/client_tests.sh
# The CUDA backend: type-checked and linted on these GPU-less machines (cudarc loads the CUDA
# libraries at run time, so no toolkit is needed), and every kernel source compiled to PTX/SASS
# for sm_90 with NVRTC from the nvidia-cuda-nvrtc wheel.
run_step cuda-lint cargo clippy -p opt-rs --features cuda --all-targets -- -D warnings
run_step ptx bash scripts/check_ptx.sh
# Sharded training and inference across processes: tp / fsdp / dp runs of the parity fixture
# under OpenMPI's mpirun (installs openmpi-bin when missing).
run_step dist bash scripts/dist_tests.sh
