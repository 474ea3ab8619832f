"""The job tabs in a real Chromium: the workbench (`python -m workbench`) runs as a real server on a
free port over a tmp workspace holding a tiny target (random 8-layer Llama + SmolLM2's tokenizer)
and tiny chat data. The browser fills the Train form, starts a real training job (a child process
through `specforge_core.jobs`), watches the loss / acc_k / acceptance plots fill with metrics,
cancels the job from the Jobs tab, reloads the page and finds the job still listed (cancelled), with
its curve still drawn in the Train tab.

Every request to anything but the local server is aborted and recorded: the page must work offline.
Set WB_SCREENSHOT_DIR to keep the screenshots.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import tiny_llama_config
from test_browser_mask import _screenshot, _settle, browser, new_offline_page, serve_workbench  # noqa: F401

pytestmark = pytest.mark.browser

PLOT_POINTS_JS = """sel => { const g = document.querySelector(sel + ' .js-plotly-plot');
  if (!g || !g.data) return -1; return g.data.reduce((n, t) => n + (t.x ? t.x.length : 0), 0); }"""


def _write_chat(path: Path, n: int) -> None:
    rnd = random.Random(0)
    cities = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Cuba", "Havana")]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            country, city = rnd.choice(cities)
            turns = [{"role": "user", "content": f"What is the capital of {country}?"},
                     {"role": "assistant", "content": f"The capital of {country} is {city}."}]
            f.write(json.dumps({"id": f"row{i}", "conversations": turns}) + "\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    from specforge_core.targets import load_tokenizer

    ws = tmp_path_factory.mktemp("jobs_ws")
    target = ws / "tiny_target"
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=49152, hidden_size=32, num_hidden_layers=8)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    LlamaForCausalLM(cfg).save_pretrained(target)
    load_tokenizer("default").save_pretrained(target)
    (ws / "data").mkdir()
    _write_chat(ws / "data" / "tiny_train.jsonl", 40)
    return ws


@pytest.fixture(scope="module")
def server(workspace):
    yield from serve_workbench(workspace, workspace.parent / "workbench_jobs.log")


@pytest.fixture
def page(browser):  # noqa: F811
    ctx, pg = new_offline_page(browser)
    yield pg
    ctx.close()


def _fill(pg, elem_id: str, value: str) -> None:
    pg.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def _fill_held(pg, values: dict[str, str], settle_ms: int = 1500, tries: int = 10) -> None:
    """Fill fields, then refill until every one keeps its value for `settle_ms`.

    On a loaded machine a field can be overwritten after a quick fill: an accordion's fields mount when it opens
    and may take their initial value after the fill; a dropdown can answer twice and put its defaults back.
    """
    boxes = {k: pg.locator(f"#{k} textarea, #{k} input").first for k in values}
    todo = dict(values)
    for _ in range(tries):
        for k, v in todo.items():
            boxes[k].fill(v)
        pg.wait_for_timeout(settle_ms)
        todo = {k: v for k, v in values.items() if boxes[k].input_value() != v}
        if not todo:
            return
    raise AssertionError(f"fields do not keep their values: {({k: boxes[k].input_value() for k in todo})}")


def _points(pg, elem_id: str) -> int:
    return pg.evaluate(PLOT_POINTS_JS, f"#{elem_id}")


def test_train_watch_cancel_reload(page, server, workspace, tmp_path):
    page.goto(server.url)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-launch", timeout=30_000)

    # A bad path is refused by field, before any job starts.
    _fill(page, "train-train-data", "../outside.jsonl")
    page.locator("#train-launch").click()
    page.wait_for_selector("#train-message .form-error", timeout=30_000)
    err = page.locator("#train-message").inner_text()
    assert "train data" in err and "outside the workspace" in err

    _fill(page, "train-target-model", "tiny_target")
    _fill(page, "train-train-data", "data/tiny_train.jsonl")
    _fill(page, "train-chat-template", "chatml")
    _fill(page, "train-max-length", "64")
    # The full vocab: a random target's argmax would fall outside a small draft vocab (nothing counted).
    _fill(page, "train-draft-vocab-size", "49152")
    _fill(page, "train-ttt-length", "2")
    _fill(page, "train-batch-size", "2")
    _fill(page, "train-epochs", "500")  # far more than the test waits for: it is cancelled
    _fill(page, "train-output-dir", "runs/tiny")
    page.locator("#train-device input").click()
    page.get_by_role("option", name="cpu", exact=True).click()

    page.locator("#train-show-cli").click()
    page.wait_for_function("() => (document.querySelector('#train-cli')?.innerText || '').includes('--epochs 500')",
                           timeout=30_000)
    cli = page.locator("#train-cli").inner_text()
    assert "specforge-wb train" in cli and "tiny_target" in cli and "--device cpu" in cli

    page.locator("#train-launch").click()
    page.wait_for_selector("#train-status .job-card[data-status='running']", timeout=30_000)
    # The plots fill from metrics.jsonl as the job writes it, polled by the page's timer.
    page.wait_for_function(f"() => ({PLOT_POINTS_JS})('#train-loss-plot') >= 2", timeout=120_000)
    first = _points(page, "train-loss-plot")
    page.wait_for_function(f"n => ({PLOT_POINTS_JS})('#train-loss-plot') > n", arg=first, timeout=60_000)
    assert _points(page, "train-acc-plot") > 0 and _points(page, "train-accept-plot") > 0
    summary = page.locator("#train-summary").inner_text()
    assert "step" in summary and "no position was counted" not in summary
    _screenshot(page, tmp_path, "wb_train_running.png")

    # Cancel it from the Jobs tab.
    page.get_by_role("tab", name="Jobs").click()
    page.locator("#jobs-refresh").click()
    page.wait_for_function("() => document.querySelector('#jobs-table')?.innerText.includes('running')",
                           timeout=30_000)
    page.wait_for_selector("#jobs-card .job-card[data-status='running']", timeout=30_000)
    job_id = page.locator("#jobs-card .job-card").get_attribute("data-job-id")
    assert job_id and "train" in job_id
    page.locator("#jobs-cancel").click()
    page.wait_for_selector("#jobs-card .job-card[data-status='cancelled']", timeout=60_000)
    assert "cancelled" in page.locator("#jobs-message").inner_text()
    page.wait_for_function("() => (document.querySelector('#jobs-log textarea')?.value || '').includes('cancelled')",
                           timeout=30_000)
    _screenshot(page, tmp_path, "wb_jobs_cancelled.png")

    # A reload keeps everything: the job is listed, cancelled; the Train tab shows its curve again.
    page.reload()
    page.get_by_role("tab", name="Jobs").click()
    page.wait_for_function("id => document.querySelector('#jobs-table')?.innerText.includes(id)", arg=job_id,
                           timeout=30_000)
    assert "cancelled" in page.locator("#jobs-table").inner_text()
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function(f"() => ({PLOT_POINTS_JS})('#train-loss-plot') >= 2", timeout=30_000)
    page.wait_for_selector("#train-status .job-card[data-status='cancelled']", timeout=30_000)
    # The cancel left a checkpoint behind (the trainer saves one on SIGTERM).
    page.wait_for_function("() => document.querySelector('#train-checkpoints')?.innerText.includes('step_')",
                           timeout=30_000)
    _settle(page)
    _screenshot(page, tmp_path, "wb_train_after_reload.png")
    assert page.external_requests == [], page.external_requests


def test_data_tab_prepares_and_shows_a_dataset(page, server, workspace, tmp_path):
    (workspace / "uploads").mkdir(exist_ok=True)
    lines = (workspace / "data" / "tiny_train.jsonl").read_text().splitlines()[:12] + ["{broken", '{"id": 5}']
    (workspace / "uploads" / "raw.jsonl").write_text("\n".join(lines) + "\n")
    page.goto(server.url)
    page.get_by_role("tab", name="Data").click()
    _fill(page, "data-file", "uploads/raw.jsonl")
    page.keyboard.press("Escape")
    _fill(page, "data-name", "raw")
    page.locator("#data-run").click()
    page.wait_for_selector("#data-status .job-card[data-status='finished']", timeout=90_000)
    assert "2 skipped" in page.locator("#data-status").inner_text()
    page.wait_for_function("() => document.querySelector('#data-view-file input')?.value === 'data/raw_train.jsonl'",
                           timeout=30_000)
    page.locator("#data-load").click()
    page.wait_for_function("() => document.querySelector('#data-stats')?.innerText.includes('rows')",
                           timeout=60_000)
    assert _points(page, "data-turns-plot") > 0 and _points(page, "data-tokens-plot") > 0
    assert "2 rows skipped" in page.locator("#data-skipped-summary").inner_text()
    assert "row0" in page.locator("#data-preview").inner_text()
    _screenshot(page, tmp_path, "wb_data.png")
    assert page.external_requests == [], page.external_requests
