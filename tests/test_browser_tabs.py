"""The buttons no other browser test clicks, in a real Chromium, end to end (issue 16): the workbench runs
as a real server over a tmp workspace with a tiny target (random 8-layer Llama, hidden 32, SmolLM2's
tokenizer), tiny chat data and a two-step training run made up front (a real `train` job).

- Train: a reloaded page shows the form of the run it shows; picking the Medusa family swaps in its fields
  and its CLI command; Export and Check run as jobs.
- Benchmark: the in-process mode (the `evaluate` job) fills the results table and charts; the
  reference-server button starts a server that the SGLang mode then benchmarks by its URL.
- Regenerate: against the project's scripted OpenAI-API server on loopback, with failures injected,
  then Resume with "retry errors" once the server behaves.
- Data: a file dragged into the upload box lands in `uploads/` and is previewed; a fresh workspace
  starts with the sample dataset and says so.

Every request to anything but the local server is aborted and recorded: the page must work offline.
Set WB_SCREENSHOT_DIR to keep the screenshots.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from conftest import tiny_llama_config
from test_browser_jobs import _fill, _fill_held, _points, _write_chat
from test_browser_mask import Server, _free_port, _screenshot, browser, new_offline_page, serve_workbench  # noqa: F401

pytestmark = pytest.mark.browser

RUN = "runs/tiny"


def _runner(ws):
    from specforge_core.jobs.runner import runner

    return runner(ws)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny target, tiny data, and a finished two-step training run of a draft for it."""
    import torch
    from transformers import LlamaForCausalLM

    from specforge_core.targets import load_tokenizer

    ws = tmp_path_factory.mktemp("tabs_ws")
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=49152, hidden_size=32, num_hidden_layers=8)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    LlamaForCausalLM(cfg).save_pretrained(ws / "tiny_target")
    load_tokenizer("default").save_pretrained(ws / "tiny_target")
    (ws / "data").mkdir()
    _write_chat(ws / "data" / "tiny_train.jsonl", 12)
    r = _runner(ws)
    job = r.submit("train", {"target_model": str(ws / "tiny_target"), "train_data": [str(ws / "data" / "tiny_train.jsonl")],
                             "chat_template": "chatml", "max_length": 64, "draft_vocab_size": 49152,
                             "ttt_length": 2, "batch_size": 2, "max_steps": 2, "device": "cpu",
                             "output_dir": str(ws / RUN), "cache_dir": str(ws / "cache")}, cwd=ws)
    job = r.wait(job.id, timeout=300)
    assert job.status == "finished", r.log_tail(job.id, 40)
    return ws


@pytest.fixture(scope="module")
def server(workspace):
    yield from serve_workbench(workspace, workspace.parent / "workbench_tabs.log")


@pytest.fixture
def page(browser):  # noqa: F811
    ctx, pg = new_offline_page(browser)
    yield pg
    ctx.close()


def _value(pg, elem_id: str) -> str:
    return pg.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def _pick(pg, elem_id: str, option: str) -> None:
    pg.locator(f"#{elem_id} input").click()
    pg.get_by_role("option", name=option, exact=True).click()


def _open(pg, elem_id: str) -> None:
    """Open a closed accordion (its label button is the first button inside it)."""
    pg.locator(f"#{elem_id} > button").first.click()


def _wait_card(pg, elem_id: str, status: str = "finished", timeout: float = 180_000) -> None:
    """Wait for a job card in `elem_id` to reach `status`; a failed job fails the test with its card (log tail)."""
    pg.wait_for_function(
        "([sel, st]) => { const c = document.querySelector(sel + ' .job-card[data-status]');"
        " return c && (c.dataset.status === st || c.dataset.status === 'failed' || c.dataset.status === 'lost'); }",
        arg=[f"#{elem_id}", status], timeout=timeout)
    got = pg.locator(f"#{elem_id} .job-card[data-status]").first.get_attribute("data-status")
    assert got == status, pg.locator(f"#{elem_id}").inner_text()


def _wait_http(url: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer in {timeout:.0f} s")


def test_train_tab_restores_the_form_of_its_run(page, server, workspace, tmp_path):
    page.goto(server.url)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-status .job-card[data-status='finished']", timeout=60_000)
    # The form is the run's, not the defaults: a reload shows what the curves come from.
    page.wait_for_function("() => document.querySelector('#train-output-dir textarea, #train-output-dir input')"
                           "?.value === 'runs/tiny'", timeout=30_000)
    assert _value(page, "train-target-model") == "tiny_target"
    assert _value(page, "train-train-data") == "data/tiny_train.jsonl"
    assert _value(page, "train-max-steps") == "2" and _value(page, "train-ttt-length") == "2"
    assert _value(page, "train-device") == "cpu"
    page.wait_for_function("() => document.querySelector('#train-checkpoints')?.innerText.includes('step_')",
                           timeout=30_000)
    _screenshot(page, tmp_path, "wb_train_restored.png")
    assert page.external_requests == [], page.external_requests


def test_train_tab_picks_medusa(page, server, workspace, tmp_path):
    """The draft family is a visible choice: picking medusa swaps EAGLE3's fields for Medusa's, and the CLI
    command carries --draft-type medusa without the (now hidden) TTT length the restored run was started with."""
    page.goto(server.url)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function("() => document.querySelector('#train-output-dir textarea, #train-output-dir input')"
                           "?.value === 'runs/tiny'", timeout=60_000)
    assert _value(page, "train-draft-type") == "eagle3" and _value(page, "train-ttt-length") == "2"
    assert page.locator("#train-ttt-length").is_visible() and not page.locator("#train-medusa-num-heads").is_visible()

    _pick(page, "train-draft-type", "medusa")
    page.wait_for_selector("#train-medusa-num-heads", state="visible", timeout=30_000)
    page.wait_for_selector("#train-ttt-length", state="hidden", timeout=30_000)
    assert page.locator("#train-medusa-num-layers").is_visible() and page.locator("#train-medusa-decay").is_visible()
    assert _value(page, "train-output-dir") == "runs/tiny"  # a run dir of the user's own is kept
    _fill(page, "train-medusa-num-heads", "2")
    page.locator("#train-show-cli").click()
    page.wait_for_function("() => (document.querySelector('#train-cli')?.innerText || '')"
                           ".includes('--draft-type medusa')", timeout=30_000)
    cli = page.locator("#train-cli").inner_text()
    assert "--medusa-num-heads 2" in cli and "--ttt-length" not in cli and "tiny_target" in cli
    _screenshot(page, tmp_path, "wb_train_medusa.png")
    assert page.external_requests == [], page.external_requests


def test_train_tab_export_and_check_buttons(page, server, workspace, tmp_path):
    page.goto(server.url)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-status .job-card[data-status='finished']", timeout=60_000)
    page.wait_for_function("() => document.querySelector('#train-checkpoints')?.innerText.includes('step_')",
                           timeout=30_000)

    page.locator("#train-export").click()
    page.wait_for_function("() => document.querySelector('#train-side-status .job-card')?.innerText"
                           ".includes('export')", timeout=30_000)
    try:
        _wait_card(page, "train-side-status", timeout=180_000)
    finally:
        _screenshot(page, tmp_path, "wb_train_export.png")
    assert (workspace / RUN / "serving" / "config.json").is_file()

    page.locator("#train-check").click()
    page.wait_for_function("() => document.querySelector('#train-side-status .job-card')?.innerText"
                           ".includes('check-draft')", timeout=30_000)
    _wait_card(page, "train-side-status", timeout=180_000)
    side = page.locator("#train-side-status")
    assert side.locator(".wb-ok").count() >= 1 and side.locator(".mask-error").count() == 0, side.inner_text()
    _screenshot(page, tmp_path, "wb_train_export_check.png")
    assert page.external_requests == [], page.external_requests


@pytest.fixture(scope="module")
def serving(workspace):
    """The run's serving export, made in-process (the Export button's job cannot run yet: see
    ENGINE_POSITIONAL_BUG)."""
    from specforge_core.events import null_events
    from specforge_core.training.config import ExportConfig
    from specforge_core.training.export import export_draft

    d = workspace / RUN / "serving-ref"
    export_draft(ExportConfig(checkpoint=str(workspace / RUN), output=str(d), target=str(workspace / "tiny_target"),
                              overwrite=True), null_events())
    return d


def test_benchmark_in_process_then_reference_server(page, server, workspace, serving, tmp_path):
    page.goto(server.url)
    page.get_by_role("tab", name="Benchmark").click()
    # No SGLang here: the in-process evaluator is the mode a CPU user starts in.
    page.wait_for_selector("#bench-mode input[value='In-process (this machine, no server)']:checked",
                           timeout=30_000)
    assert _value(page, "bench-eval-target") == "default"
    _fill_held(page, {"bench-eval-target": "tiny_target", "bench-eval-draft": RUN,
                      "bench-eval-prompts": "data/tiny_train.jsonl", "bench-eval-max-prompts": "2",
                      "bench-eval-max-new-tokens": "8"})
    _pick(page, "bench-eval-device", "cpu")
    page.locator("#bench-run").click()
    _wait_card(page, "bench-status", timeout=240_000)
    page.wait_for_function("() => document.querySelector('#bench-table')?.innerText.includes('1,3,1,4')",
                           timeout=30_000)
    table = page.locator("#bench-table").inner_text()
    assert "1,0,0,0" in table and "tiny_train.jsonl" in table
    assert "in-process" in page.locator("#bench-summary").inner_text()
    assert _points(page, "bench-acc-plot") == 2 and _points(page, "bench-speed-plot") == 2
    res = json.loads((workspace / "bench" / "evaluate.json").read_text())
    assert res["kind"] == "evaluate" and res["finished"] and res["results"][0]["config"] == "1,3,1,4"
    _screenshot(page, tmp_path, "wb_bench_inprocess.png")

    # The SGLang mode, against the reference server started by its button.
    page.get_by_label("SGLang server").check()
    page.wait_for_selector("#bench-server", state="visible", timeout=30_000)
    assert _value(page, "bench-results-path") == "bench/results.json"
    _open(page, "bench-ref")
    port = _free_port()
    _fill_held(page, {"bench-ref-target": "tiny_target", "bench-ref-draft": str(serving.relative_to(workspace)),
                      "bench-ref-port": str(port)})
    page.locator("#bench-ref-start").click()
    page.wait_for_function("() => (document.querySelector('#bench-ref-message')?.innerText || '')"
                           ".includes('reference server starting as job')", timeout=30_000)
    _wait_http(f"http://127.0.0.1:{port}/health")
    ref_jobs = [j for j in _runner(workspace).list_jobs(kind="serve-reference") if j.status == "running"]
    assert len(ref_jobs) == 1 and ref_jobs[0].config["draft"] == str(serving.resolve())
    try:
        _fill(page, "bench-server", f"http://127.0.0.1:{port}")
        _fill(page, "bench-target", "tiny_target")
        _fill(page, "bench-benchmark", "prompts:2=data/tiny_train.jsonl")
        _fill(page, "bench-config-list", "1,3,1,4")
        _fill(page, "bench-max-new-tokens", "8")
        _fill(page, "bench-output", "bench/ref.json")
        page.locator("#bench-run").click()
        page.wait_for_function("() => document.querySelector('#bench-status .job-card')?.innerText.includes('bench')",
                               timeout=30_000)
        _wait_card(page, "bench-status", timeout=180_000)
        page.wait_for_function("() => document.querySelector('#bench-summary')?.innerText.includes('ref.json')",
                               timeout=30_000)
        table = page.locator("#bench-table").inner_text()
        assert "1,3,1,4" in table and "prompts" in table
        ref = json.loads((workspace / "bench" / "ref.json").read_text())
        assert ref["runs"][0]["status"] == "ok" and ref["runs"][0]["acceptance_length_pooled"] >= 1.0
        _screenshot(page, tmp_path, "wb_bench_reference.png")
    finally:
        _runner(workspace).cancel(ref_jobs[0].id, timeout=10)
    assert page.external_requests == [], page.external_requests


def test_regenerate_against_a_loopback_server_then_resume(page, server, workspace, tmp_path):
    from specforge_core.regen.testserver import Faults, ServerThread

    with ServerThread(faults=Faults(fail_rate=0.5, seed=0)) as srv:
        page.goto(server.url)
        page.get_by_role("tab", name="Regenerate").click()
        _open(page, "regen-advanced")
        _fill_held(page, {"regen-input": "data/tiny_train.jsonl", "regen-output": "data/regen.jsonl",
                          "regen-server-address": srv.address, "regen-concurrency": "4", "regen-max-tokens": "32",
                          "regen-max-rows": "8", "regen-max-retries": "0", "regen-retire-after": "100"})
        page.locator("#regen-launch").click()
        _wait_card(page, "regen-status", timeout=120_000)
        page.wait_for_function("() => document.querySelector('#regen-errors-summary')?.innerText"
                               ".includes('failed samples')", timeout=30_000)
        summary = page.locator("#regen-errors-summary").inner_text()
        n_failed = int(summary.split("failed samples")[0].split()[-1])
        assert 0 < n_failed < 8 and "HTTP 500" in summary
        assert "samples written" in page.locator("#regen-status").inner_text()
        _screenshot(page, tmp_path, "wb_regen_errors.png")
        first_job = page.locator("#regen-status .job-card").get_attribute("data-job-id")

        # The server recovers; Resume retries exactly the failed ids.
        srv.server.faults = Faults()
        page.locator("#regen-retry input").check()
        page.locator("#regen-resume-job").click()
        page.wait_for_function("id => { const c = document.querySelector('#regen-status .job-card');"
                               " return c && c.dataset.jobId !== id; }", arg=first_job, timeout=30_000)
        assert f"resumed {first_job}" in page.locator("#regen-message").inner_text()
        _wait_card(page, "regen-status", timeout=120_000)
        page.wait_for_function("() => document.querySelector('#regen-errors-summary')?.innerText"
                               ".includes('0 failed samples')", timeout=30_000)
    rows = [json.loads(x) for x in (workspace / "data" / "regen.jsonl").read_text().splitlines() if x.strip()]
    assert sorted(r["id"] for r in rows) == [f"row{i}" for i in range(8)]
    assert page.external_requests == [], page.external_requests


def test_data_tab_upload(page, server, workspace, tmp_path):
    src = tmp_path / "My chats (v2).jsonl"
    _write_chat(src, 5)
    page.goto(server.url)
    page.get_by_role("tab", name="Data").click()
    page.locator("#data-upload input[type='file']").set_input_files(str(src))
    page.wait_for_function("() => (document.querySelector('#data-upload-message')?.innerText || '')"
                           ".includes('saved uploads/')", timeout=60_000)
    assert "saved uploads/My_chats_v2_.jsonl" in page.locator("#data-upload-message").inner_text()
    assert (workspace / "uploads" / "My_chats_v2_.jsonl").read_bytes() == src.read_bytes()
    # It is a workspace file like any other: selected for prepare-data and for a look.
    page.wait_for_function("() => document.querySelector('#data-view-file input')?.value === "
                           "'uploads/My_chats_v2_.jsonl'", timeout=30_000)
    assert _value(page, "data-file") == "uploads/My_chats_v2_.jsonl"
    page.locator("#data-load").click()
    page.wait_for_function("() => document.querySelector('#data-stats')?.innerText.includes('5 rows')",
                           timeout=60_000)
    assert "row0" in page.locator("#data-preview").inner_text()
    _screenshot(page, tmp_path, "wb_data_upload.png")
    assert page.external_requests == [], page.external_requests


def test_fresh_workspace_starts_with_the_sample(browser, tmp_path):  # noqa: F811
    ws = tmp_path / "fresh"
    srv = Server(["workbench", "--workspace", str(ws)], tmp_path / "fresh.log")
    ctx, pg = new_offline_page(browser)
    try:
        srv.wait()
        pg.goto(srv.url)
        pg.get_by_role("tab", name="Data").click()
        pg.wait_for_selector("#data-sample-note", state="visible", timeout=30_000)
        assert "samples/sample_sharegpt.jsonl" in pg.locator("#data-sample-note").inner_text()
        assert _value(pg, "data-file") == "samples/sample_sharegpt.jsonl"
        pg.locator("#data-run").click()
        _wait_card(pg, "data-status", timeout=120_000)
        assert "2 skipped" in pg.locator("#data-status").inner_text()
        pg.get_by_role("tab", name="Train").click()
        assert _value(pg, "train-train-data") == "data/sample_sharegpt_train.jsonl"
        assert (ws / "data" / "sample_sharegpt_train.jsonl").is_file()
        pg.get_by_role("tab", name="Data").click()
        _screenshot(pg, tmp_path, "wb_data_fresh.png")
        assert pg.external_requests == [], pg.external_requests
    finally:
        ctx.close()
        srv.stop()
