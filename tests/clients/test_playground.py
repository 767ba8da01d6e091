"""The playground page in headless Chromium (Debian's `chromium`), driven over the Chrome
DevTools protocol: load the page, submit a prompt, see the text stream in — and check that the
streamed text is what the API returns for the same request."""
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest
import websocket

from conftest import MODEL_NAME

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


def chromium_binary():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium found: install Debian's chromium package (scripts/client_tests.sh does)")


class Browser:
    """One headless Chromium with a fresh profile, and a DevTools session on its page."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="opt-rs-chromium-")
        self.proc = subprocess.Popen(
            [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Chromium writes the port it picked to DevToolsActivePort in the profile.
        port_file = pathlib.Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while time.time() < deadline and not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                pytest.fail(f"chromium exited with {self.proc.returncode}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method, **params):
        """Send a command and wait for its reply (events in between are skipped)."""
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.eval(expression):
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


def test_playground_streams_a_completion(server, browser):
    browser.call("Page.enable")
    browser.call("Page.navigate", url=server.url + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('generate')", timeout=30)
    browser.wait_for(f"document.getElementById('model').textContent.includes({json.dumps(MODEL_NAME)})", timeout=30)
    prompt = "The capital of France is"
    browser.eval(
        f"""(() => {{
            document.getElementById('prompt').value = {json.dumps(prompt)};
            document.getElementById('max_tokens').value = '16';
            document.getElementById('temperature').value = '0';
            document.getElementById('logprobs').value = '3';
            document.getElementById('generate').click();
            return true;
        }})()"""
    )
    browser.wait_for("document.getElementById('status').textContent.startsWith('done')")
    assert browser.eval("document.getElementById('error').textContent") == ""
    shown = browser.eval("document.getElementById('generated').textContent")
    chunks = browser.eval("window.__chunks")
    spans = browser.eval("document.querySelectorAll('#tokens span').length")
    coloured = browser.eval("Array.from(document.querySelectorAll('#tokens span')).filter(s => s.style.background).length")
    assert chunks >= 2, f"the text arrived in {chunks} chunk(s), not streamed"
    assert spans == chunks and coloured == spans, (spans, chunks, coloured)

    # What the page showed is what the API gives for the same request.
    body = json.dumps(
        {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0, "top_p": 1, "logprobs": 3}
    ).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    want = json.load(urllib.request.urlopen(req, timeout=120))
    assert shown == want["choices"][0]["text"]
    assert spans == len(want["choices"][0]["logprobs"]["tokens"])
