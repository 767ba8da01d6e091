"""Fixtures for the client tests: a real `opt-rs serve` on loopback (port 0).

Environment (set by scripts/client_tests.sh):
  OPT_RS_BIN         the opt-rs binary (default: target/release/opt-rs)
  OPT_RS_TEST_MODEL  the model folder served (default: fixtures/eval_model, OPT's real vocabulary)
"""
import os
import pathlib
import subprocess
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("OPT_RS_BIN", pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "opt-rs"))
MODEL = pathlib.Path(os.environ.get("OPT_RS_TEST_MODEL", ROOT / "fixtures" / "eval_model"))
MODEL_NAME = "opt-test"
API_KEY = "test-key-123"


class Server:
    """`opt-rs serve` on a free port; the port is read from its 'listening on' line."""

    def __init__(self, *args):
        assert BIN.exists(), f"{BIN} is missing: build it with cargo build --release -p opt-rs"
        assert (MODEL / "config.json").exists(), f"{MODEL} is not a model folder"
        self.log = tempfile.NamedTemporaryFile(prefix="opt-serve-", suffix=".log", delete=False)
        cmd = [str(BIN), "serve", "--model", str(MODEL), "--port", "0", "--served-model-name", MODEL_NAME, *args]
        env = {k: v for k, v in os.environ.items() if k != "OPT_RS_API_KEY"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("listening on "):
                break
            if self.proc.poll() is not None:
                break
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"server did not start: {pathlib.Path(self.log.name).read_text()}")
        self.url = line.split()[-1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def keyed_server():
    s = Server("--api-key", API_KEY)
    yield s
    s.stop()
