"""The web page at ``/``: self-contained HTML, and a real headless Chromium driven through
the DevTools protocol: a streamed chat exchange, the live panel, a screenshot."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

httpx = pytest.importorskip("httpx")
from tests.helpers import wait_for_stderr  # noqa: E402
from tests.serve.test_server import MODEL, _client, _tiny_engine, serving  # noqa: E402


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serving(_tiny_engine) as base:
        yield base


def test_page_is_served_and_loads_nothing_from_elsewhere(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<script" in html and "/v1/chat/completions" in html
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
    assert all(not re.match(r"^[a-z]+:|^//", ref) for ref in refs), refs
    assert not re.search(r"https?://", html)


def test_stats_feed_the_live_panel(url):
    st = httpx.get(url + "/stats").json()
    for key in ("running", "waiting", "slots_used", "max_slots", "generated_tokens",
                "result_cache_hits", "result_cache_misses", "finished", "cancelled"):  # fmt: skip
        assert key in st, key
    assert st["max_slots"] == 4


class _DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg.get("result", {})

    def eval(self, js: str):
        res = self.call("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in res, res
        return res["result"].get("value")

    def wait_for(self, js: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(js)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {js}")


@pytest.fixture
def browser() -> Iterator[str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("websocket", reason="needs websocket-client for the DevTools protocol")
    profile = tempfile.mkdtemp(prefix="sk-chromium-")
    proc = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = wait_for_stderr(proc, r"DevTools listening on ws://127\.0\.0\.1:(\d+)/").group(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_in_a_real_browser(url, browser, tmp_path):
    pages = httpx.get(browser + "/json/list").json()
    page = next(p for p in pages if p["type"] == "page")
    dt = _DevTools(page["webSocketDebuggerUrl"])
    dt.call("Page.enable")
    dt.call("Page.navigate", url=url + "/")
    dt.wait_for("document.readyState === 'complete'")
    dt.wait_for("document.getElementById('health').textContent === 'ready'")
    assert dt.eval("document.getElementById('model').textContent") == f"model: {MODEL}"
    # greedy, so the page's streamed answer can be checked against the API's
    dt.eval("document.getElementById('temperature').value = '0'")
    dt.eval("document.getElementById('max_tokens').value = '24'")
    dt.eval("document.getElementById('prompt').value = 'Hello there'")
    dt.eval("document.getElementById('chat').requestSubmit()")
    dt.wait_for("document.querySelector('.msg.assistant')?.dataset.done === '1'")
    shown = dt.eval("document.querySelector('.msg.assistant').textContent")
    finish = dt.eval("document.querySelector('.msg.assistant').dataset.finish")
    want = _client(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=24,
        temperature=0,
    )
    assert shown == want.choices[0].message.content and finish == want.choices[0].finish_reason
    assert dt.eval("document.querySelectorAll('.msg.error').length") == 0
    # the live panel has polled the server and shows numbers
    dt.wait_for("/^\\d+$/.test(document.getElementById('done').textContent)")
    assert dt.eval("document.getElementById('slots').textContent").endswith("/ 4")
    shot = base64.b64decode(dt.call("Page.captureScreenshot", format="png")["data"])
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 5000
    (tmp_path / "page.png").write_bytes(shot)
