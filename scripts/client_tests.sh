#!/usr/bin/env bash
# Client tests of `opt-rs serve` against a real server on loopback: the `openai` Python client
# (from PyPI, unmodified) and the playground page in headless Chromium (Debian's package, driven
# over the DevTools protocol). Run from scripts/test.sh or alone: `bash scripts/client_tests.sh`.
#
# Setup (skipped with OPT_TEST_SKIP_SETUP=1): installs Debian's chromium (and python3-venv) when
# missing, creates .venv-clients (git-ignored via /.venv*) with the pinned packages below.
# Then builds the release binary and runs pytest on tests/clients. A run that collects no tests
# fails (pytest's exit code 5 is turned into an error), and so does any skip-free failure.
# Ends with a cargo-style "test result:" line so a caller can add the counts to its own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv-clients"
PY_PACKAGES=(openai==3.57.0 pytest==9.2.0 websocket-client==1.9.2)
DEBIAN_PACKAGES=(chromium python3-venv)

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

ensure_debian_packages() {
    local missing=() pkg
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]} > 0)) || return 0
    command -v apt-get >/dev/null 2>&1 || die "missing Debian packages (${missing[*]}) and no apt-get"
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# The venv is rebuilt only when the pinned list changes (a stamp file holds the list).
ensure_venv() {
    local stamp="$VENV/.opt-rs-requirements" want="${PY_PACKAGES[*]}"
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    log "creating $VENV with ${PY_PACKAGES[*]}"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
    printf '%s' "$want" >"$stamp"
}

if [[ "${OPT_TEST_SKIP_SETUP:-}" != "1" ]]; then
    ensure_debian_packages
    ensure_venv
fi
[[ -x "$VENV/bin/python" ]] || die "$VENV is missing (run without OPT_TEST_SKIP_SETUP=1 once)"

log "building the release binary"
cargo build --release -q -p opt-rs
export OPT_RS_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/opt-rs"

REPORT="$(mktemp "${TMPDIR:-/tmp}/opt-rs-clients.XXXXXX.xml")"
trap 'rm -f "$REPORT"' EXIT
log "pytest tests/clients"
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$REPORT" tests/clients "$@"
rc=$?
set -e

# Counts in cargo's format, from the JUnit report.
"$VENV/bin/python" - "$REPORT" <<'PY' || true
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    sys.exit(0)
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
status = "ok" if bad == 0 else "FAILED"
print(f"test result: {status}. {n - bad - skipped} passed; {bad} failed; {skipped} ignored (client tests)")
PY

if ((rc == 5)); then
    die "pytest collected no tests in tests/clients"
fi
exit "$rc"
