"""The Loss-mask view in a real Chromium: the workbench (`python -m workbench`) and the public demo
(`python -m workbench.mask_demo`) are started as real servers in subprocesses, a headless Chromium
pastes a conversation, clicks, and reads the coloured tokens back from the DOM.

Every request to anything but the local server is aborted and recorded: the page must work offline.
Set WB_SCREENSHOT_DIR to keep the screenshots (they always go to pytest's tmp dir too).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parent.parent

CONV = {
    "id": "browser-1",
    "conversations": [
        {"role": "system", "content": "You are a zoo guide."},
        {"role": "user", "content": "Do walruses sleep underwater?"},
        {"role": "assistant", "content": "Walruses can nap while floating upright."},
        {"role": "user", "content": "And penguins?"},
        {"role": "assistant", "content": "Penguins doze standing on the ice."},
    ],
}
TOKEN_JS = """() => [...document.querySelectorAll('#mask-tokens .tok-view .tok')].map(e => ({
    text: e.textContent, trained: e.classList.contains('trained'), masked: e.classList.contains('masked'),
    title: e.title, bg: getComputedStyle(e).backgroundColor}))"""


def _chromium() -> str:
    for c in CHROMIUM_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    pytest.skip("Chromium not found (/usr/bin/chromium); install it with `make browser-deps` "
                "(apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", *args, "--port", str(self.port)], cwd=REPO, env=env,
                                     stdout=self._fh, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"server did not answer in {timeout:.0f} s:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._fh.close()


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def tokenizers_ready(smol_tokenizer, llama3_tokenizer):
    # Converting the embedded SmolLM2 / building the Llama-3 tokenizer happens once, here, not
    # inside the first click (where it would count against the page timeout).
    return True


@pytest.fixture(scope="module")
def workbench_server(tmp_path_factory, tokenizers_ready):
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "data").mkdir()
    (ws / "data" / "rows.jsonl").write_text(json.dumps(CONV) + "\n", encoding="utf-8")
    srv = Server(["workbench", "--workspace", str(ws)], ws.parent / "workbench.log")
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, tokenizers_ready):
    d = tmp_path_factory.mktemp("demo")
    srv = Server(["workbench.mask_demo"], d / "demo.log")
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


def new_offline_page(browser):
    """(context, page) where the page may reach only loopback: any other request is aborted and recorded in
    `page.external_requests`, so a test can assert the app works offline."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.external_requests = []

    def _route(route):
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            pg.external_requests.append(url)
            route.abort()

    pg.route("**/*", _route)
    return ctx, pg


def serve_workbench(workspace: Path, log: Path):
    """The workbench on `workspace` for a test module (a generator for a fixture to `yield from`); jobs a
    test left running are cancelled afterwards, so none outlives the module."""
    srv = Server(["workbench", "--workspace", str(workspace)], log)
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()
        from specforge_core.jobs.runner import runner

        r = runner(workspace)
        for j in r.list_jobs():
            if j.status in ("starting", "running"):
                r.cancel(j.id, timeout=10)


@pytest.fixture
def page(browser):
    ctx, pg = new_offline_page(browser)
    yield pg
    ctx.close()


def _settle(pg) -> None:
    """Wait until Gradio has no event in flight (pending outputs are drawn faded)."""
    pg.wait_for_function("() => document.querySelectorAll('.pending, .generating').length === 0", timeout=30_000)


def _screenshot(pg, tmp_path: Path, name: str) -> Path:
    _settle(pg)
    pg.wait_for_timeout(600)  # the loading overlay fades out with a CSS transition
    out = tmp_path / name
    pg.screenshot(path=str(out), full_page=True)
    keep = os.environ.get("WB_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(keep) / name)
    return out


def _paste_and_show(pg, conversation: str, marker: str) -> list[dict]:
    pg.locator("#mask-input textarea").fill(conversation)
    pg.locator("#mask-run").click()
    pg.wait_for_function("m => [...document.querySelectorAll('#mask-tokens .tok-view .tok')]"
                         ".map(e => e.textContent).join('').includes(m)", arg=marker, timeout=60_000)
    _settle(pg)
    return pg.evaluate(TOKEN_JS)


def _assert_colours(tokens: list[dict]) -> None:
    # Real colours from the stylesheet, not just class names: green-ish trained, red-ish masked.
    def rgb(s):
        return [int(float(x)) for x in s[s.index("(") + 1:s.index(")")].split(",")[:3]]

    tr = rgb(next(t["bg"] for t in tokens if t["trained"]))
    ms = rgb(next(t["bg"] for t in tokens if t["masked"]))
    assert tr[1] > tr[0] and tr[1] > tr[2], f"trained background is not green: {tr}"
    assert ms[0] > ms[1] and ms[0] > ms[2], f"masked background is not red: {ms}"


def test_workbench_mask_tab(page, workbench_server, tmp_path):
    page.goto(workbench_server.url)
    page.get_by_role("tab", name="Loss mask").click()
    # The example is masked on page load: the view explains itself before any click.
    page.wait_for_selector("#mask-tokens .tok-view .tok.trained", timeout=60_000)

    tokens = _paste_and_show(page, json.dumps(CONV, indent=2), "Penguins doze")
    trained = "".join(t["text"] for t in tokens if t["trained"])
    masked = "".join(t["text"] for t in tokens if t["masked"])
    assert trained == "Walruses can nap while floating upright.<|im_end|>Penguins doze standing on the ice.<|im_end|>"
    for part in ("You are a zoo guide.", "Do walruses sleep underwater?", "And penguins?", "<|im_start|>assistant"):
        assert part in masked, part
    assert all(t["title"].startswith("#") and " · id " in t["title"] for t in tokens)
    assert any(t["text"].startswith("↵") for t in tokens)  # newlines are visible
    _assert_colours(tokens)
    status = page.locator("#mask-status").inner_text()
    n_tr = sum(t["trained"] for t in tokens)
    assert f"{len(tokens)} tokens" in status and f"{n_tr} trained" in status and "masked" in status
    _screenshot(page, tmp_path, "wb_mask.png")

    # train_only_last_turn keeps only the last answer.
    page.locator("#mask-last-turn input").check()
    page.locator("#mask-run").click()
    page.wait_for_function("() => ![...document.querySelectorAll('#mask-tokens .tok-view .tok.trained')]"
                           ".map(e => e.textContent).join('').includes('Walruses')", timeout=30_000)
    tokens = page.evaluate(TOKEN_JS)
    assert "".join(t["text"] for t in tokens if t["trained"]) == "Penguins doze standing on the ice.<|im_end|>"
    page.locator("#mask-last-turn input").uncheck()

    # A short max_length truncates, and the page says so prominently.
    page.locator("#mask-max-length input").fill("24")
    page.locator("#mask-run").click()
    page.wait_for_selector("#mask-status .mask-warning", timeout=30_000)
    warnings = page.locator("#mask-status .mask-warning").all_inner_texts()
    # Both answers lie beyond 24 tokens: the mask is all zero, and that is said first.
    assert warnings[0].startswith("⚠ ALL-ZERO MASK") and "raise max_length" in warnings[0], warnings
    assert any("TRUNCATED" in w for w in warnings), warnings
    assert len(page.evaluate(TOKEN_JS)) == 24 and not any(t["trained"] for t in page.evaluate(TOKEN_JS))
    page.locator("#mask-max-length input").fill("2048")

    # Bad input: a readable message, no stack trace.
    page.locator("#mask-input textarea").fill('{"id": "x", "conversations": [')
    page.locator("#mask-run").click()
    err = page.locator("#mask-status .mask-error")
    err.wait_for(timeout=30_000)
    assert "not valid JSON" in err.inner_text() and "Traceback" not in page.content()

    # Pick a row from a workspace file.
    page.get_by_label("Pick a row from a workspace file").check()
    page.locator("#mask-file textarea, #mask-file input").first.fill("data/rows.jsonl")
    page.locator("#mask-run").click()
    page.wait_for_function("() => [...document.querySelectorAll('#mask-tokens .tok-view .tok.trained')]"
                           ".map(e => e.textContent).join('').includes('Penguins doze')", timeout=30_000)
    page.locator("#mask-file textarea, #mask-file input").first.fill("../../etc/passwd")
    page.locator("#mask-run").click()
    page.wait_for_selector("#mask-status .mask-error", timeout=30_000)
    assert "outside the workspace" in page.locator("#mask-status .mask-error").inner_text()

    assert page.external_requests == [], page.external_requests


def test_workbench_compare_templates(page, workbench_server):
    page.goto(workbench_server.url)
    page.wait_for_selector("#mask-tokens .tok-view .tok", timeout=60_000)
    page.get_by_text("Compare two templates side by side").click()
    page.locator("#mask-compare-run").click()
    page.wait_for_selector("#mask-tokens-a .tok-view .tok", timeout=30_000)
    page.wait_for_selector("#mask-tokens-b .tok-view .tok", timeout=30_000)
    # auto (SmolLM2's own ChatML template) vs the named chatml template: the same mask.
    assert "Identical" in page.locator("#mask-verdict").inner_text()
    n_a = page.locator("#mask-tokens-a .tok-view .tok.trained").count()
    assert n_a > 0 and n_a == page.locator("#mask-tokens-b .tok-view .tok.trained").count()


def test_mask_demo(page, demo_server, tmp_path):
    page.goto(demo_server.url)
    page.wait_for_selector("#mask-tokens .tok-view .tok.trained", timeout=60_000)
    assert page.locator("#mask-file").count() == 0 and page.locator("#mask-source").count() == 0
    # Switch the tokenizer to Llama-3 through the dropdown.
    page.locator("#mask-tokenizer input").click()
    page.get_by_role("option", name="llama3 (Meta Llama-3)").click()
    page.locator("#mask-template input").click()
    page.get_by_role("option", name="llama3", exact=True).click()
    tokens = _paste_and_show(page, json.dumps(CONV["conversations"]), "<|eot_id|>")
    trained = "".join(t["text"] for t in tokens if t["trained"])
    assert trained == "Walruses can nap while floating upright.<|eot_id|>Penguins doze standing on the ice.<|eot_id|>"
    assert tokens[0]["text"] == "<|begin_of_text|>" and tokens[0]["masked"]
    assert "id 128000" in tokens[0]["title"]
    assert "Do walruses sleep underwater?" in "".join(t["text"] for t in tokens if t["masked"])
    _assert_colours(tokens)
    _screenshot(page, tmp_path, "wb_mask_demo.png")
    assert page.external_requests == [], page.external_requests
