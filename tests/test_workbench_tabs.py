"""The workbench's job tabs as plain functions: forms built from the config schemas, workspace paths,
real background jobs through `specforge_core.jobs.runner`, plots from real metric rows, and the app
building with every tab.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CONV = {"id": "r1", "conversations": [
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red is a primary colour."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Blue."}]}


def _rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        turns = [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                 {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}]
        out.append({"id": f"q{i}", "conversations": turns})
    return out


@pytest.fixture
def ws(tmp_path):
    w = tmp_path / "ws"
    (w / "data").mkdir(parents=True)
    return w


def _n_tokens(tok, conv) -> int:
    ids = tok.apply_chat_template(conv, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# forms.py
# ------------------------------------------------------------------------------------------------
def test_field_kinds_follow_the_schema():
    from specforge_core.data.config import InspectMaskConfig
    from specforge_core.training.config import TrainConfig
    from workbench.forms import field_spec

    kinds = {n: field_spec(TrainConfig, n).kind for n in TrainConfig.model_fields}
    assert kinds["train_only_last_turn"] == "checkbox"
    assert kinds["device"] == "dropdown" and field_spec(TrainConfig, "device").choices == ["auto", "cpu", "cuda"]
    assert kinds["max_length"] == "int" and kinds["lr"] == "float"
    assert kinds["train_data"] == "list" and kinds["aux_layer_ids"] == "list"
    assert field_spec(TrainConfig, "aux_layer_ids").item_type is int
    assert kinds["target_model"] == "text" and kinds["max_steps"] == "int"
    assert kinds["report_to"] == "multiselect"
    assert field_spec(InspectMaskConfig, "color").kind == "tristate"
    # label and info come from the field
    s = field_spec(TrainConfig, "ttt_length")
    assert s.label == "ttt length" and "unroll" in s.info and s.default == 7


def test_form_roundtrip_and_errors_by_field(tmp_path):
    from specforge_core.training.config import TrainConfig
    from workbench.forms import FormError, config_to_values, field_specs, values_to_config

    specs = field_specs(TrainConfig)
    cfg = TrainConfig(train_data=["a b.jsonl", "c.jsonl"], aux_layer_ids=[1, 3, 4], lr=3e-3, max_steps=5,
                      report_to=["tensorboard"], train_only_last_turn=True, device="cpu")
    vals = config_to_values(cfg, specs)
    assert vals[[s.name for s in specs].index("train_data")] == "'a b.jsonl' c.jsonl"
    assert values_to_config(TrainConfig, specs, vals) == cfg

    def with_(**kw):
        v = list(vals)
        for k, x in kw.items():
            v[[s.name for s in specs].index(k)] = x
        return v

    with pytest.raises(FormError) as e:
        values_to_config(TrainConfig, specs, with_(max_length="lots", aux_layer_ids="1 x"))
    assert set(e.value.errors) == {"max_length", "aux_layer_ids"}
    assert "not a number" in e.value.errors["max_length"] and "'x'" in e.value.errors["aux_layer_ids"]
    with pytest.raises(FormError) as e:
        values_to_config(TrainConfig, specs, with_(lr=-1, ttt_length=0))
    assert set(e.value.errors) == {"lr", "ttt_length"}
    assert "greater than 0" in e.value.errors["lr"]
    # A model-level rule (no data at all) is reported for the whole form, with the engine's words.
    with pytest.raises(FormError) as e:
        values_to_config(TrainConfig, specs, with_(train_data=""))
    assert "--train-data" in e.value.errors[""]
    # An empty optional number means None, not 0.
    assert values_to_config(TrainConfig, specs, with_(max_steps=None)).max_steps is None
    assert values_to_config(TrainConfig, specs, with_(max_steps="")).max_steps is None
    assert values_to_config(TrainConfig, specs, with_(max_steps="12")).max_steps == 12


def test_render_errors_names_label_and_flag():
    from specforge_core.training.config import TrainConfig
    from workbench.forms import FormError, field_specs, render_errors

    out = render_errors(FormError({"lr": "must be > 0", "": "give data"}), field_specs(TrainConfig, ["lr"]))
    assert "<b>lr</b>" in out and "--lr" in out and "must be &gt; 0" in out and "give data" in out


# ------------------------------------------------------------------------------------------------
# plots.py
# ------------------------------------------------------------------------------------------------
def test_training_figures_from_metric_rows():
    from workbench.plots import accept_len_figure, acc_figure, figure_has_data, loss_figure

    rows = [{"split": "train", "step": s, "loss": 5.0 - s, "acc_0": 0.1 * s, "acc_1": 0.05 * s, "acc_2": 0.02 * s,
             "sim_accept_len": 1 + 0.1 * s, "loss_normalization": "counted"} for s in range(1, 5)]
    rows.append({"split": "eval", "step": 4, "loss": 1.5, "acc_0": 0.3, "sim_accept_len": 1.25})
    lf = loss_figure(rows)
    assert [t.name for t in lf.data] == ["train", "eval"]
    assert list(lf.data[0].y) == [4.0, 3.0, 2.0, 1.0] and list(lf.data[1].x) == [4]
    af = acc_figure(rows)
    assert [t.name for t in af.data] == ["acc_0", "acc_1", "acc_2"]
    assert list(af.data[1].y) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    sf = accept_len_figure(rows)
    assert list(sf.data[1].y) == [1.25]
    for f in (loss_figure([]), acc_figure([]), accept_len_figure([])):
        assert not figure_has_data(f) and "no metrics yet" in f.layout.title.text

    # A Medusa run writes the same acc_i columns, one per head: the legend and titles say "head i".
    mf = acc_figure(rows, family="medusa")
    assert [t.name for t in mf.data] == ["head 0", "head 1", "head 2"] and "head" in mf.layout.title.text
    assert list(mf.data[1].y) == list(af.data[1].y) and "TTT" not in loss_figure(rows, "medusa").layout.title.text


# ------------------------------------------------------------------------------------------------
# Data tab
# ------------------------------------------------------------------------------------------------
def test_data_preview_stats_and_skip_report(ws, smol_tokenizer):
    from workbench.tabs import data_tab as dt

    _write_jsonl(ws / "data" / "mine_train.jsonl", _rows(9))
    _write_jsonl(ws / "data" / "mine_skipped.jsonl", [
        {"file": "in.jsonl", "line": 3, "code": "bad_json", "message": "not JSON"},
        {"file": "in.jsonl", "line": 7, "code": "no_assistant", "message": "no assistant turn"},
        {"file": "in.jsonl", "line": 8, "code": "bad_json", "message": "not JSON"}])
    assert dt.data_files(ws)[0] == "data/mine_train.jsonl"
    df = dt.preview_rows(ws, "data/mine_train.jsonl", n=5)
    assert list(df["id"]) == ["q0", "q1", "q2", "q3", "q4"] and list(df["turns"]) == [4, 2, 2, 4, 2]
    assert df["first assistant turn"][2] == "2 plus 2 is 4."

    md, turns_fig, tok_fig, stats = dt.dataset_stats(ws, "data/mine_train.jsonl", "default")
    assert stats["rows"] == 9 and sorted(stats["turns"]) == [2] * 6 + [4] * 3
    expected = [_n_tokens(smol_tokenizer, r["conversations"]) for r in _rows(9)]
    assert stats["token_lengths"] == expected
    assert list(turns_fig.data[0].x) == stats["turns"] and list(tok_fig.data[0].x) == expected
    assert "9 rows" in md and f"{sum(expected):,}" in md

    smd, sdf = dt.skipped_rows(ws, "data/mine_train.jsonl")
    assert "3 rows skipped" in smd and "bad_json: 2" in smd
    assert list(sdf["line"]) == [3, 7, 8] and list(sdf.columns) == dt.SKIPPED_COLUMNS

    err, *_ = dt.inspect_file(ws, "../../etc/passwd", "default")
    assert "outside the workspace" in err


def test_prepare_config_is_built_inside_the_workspace(ws):
    from workbench.forms import FormError
    from workbench.tabs import data_tab as dt

    _write_jsonl(ws / "uploads" / "raw.jsonl", [CONV])
    vals = ["mine", None, 0.25, 3, ""]
    cfg = dt.prepare_config(ws, dt.SOURCE_FILE, None, "uploads/raw.jsonl", "", vals)
    assert cfg.input == [str((ws / "uploads" / "raw.jsonl").resolve())]
    assert cfg.output == str(ws / "data") and cfg.split_eval == 0.25 and cfg.seed == 3 and cfg.sample_size is None
    with pytest.raises(FormError) as e:
        dt.prepare_config(ws, dt.SOURCE_FILE, None, "/etc/passwd", "", vals)
    assert "outside the workspace" in e.value.errors["input"]
    with pytest.raises(FormError) as e:
        dt.prepare_config(ws, dt.SOURCE_FILE, None, "uploads/raw.jsonl", "", ["mine", None, 1.5, 0, ""])
    assert "split_eval" in e.value.errors
    cfg = dt.prepare_config(ws, dt.SOURCE_PRESET, "ultrachat", "", "dl/uc", vals)
    assert cfg.dataset == "ultrachat" and cfg.source_path == str((ws / "dl" / "uc").resolve())


def _wait(ws, job_id, timeout=90.0):
    from workbench.common import job_runner

    return job_runner(ws).wait(job_id, timeout=timeout)


def test_prepare_data_runs_as_a_job_and_the_jobs_tab_lists_it(ws):
    from workbench.tabs import data_tab as dt
    from workbench.tabs import jobs_tab as jt

    _write_jsonl(ws / "uploads" / "raw.jsonl", [json.dumps(r) for r in _rows(6)] + ["{not json", '{"id": "x"}'])
    card, job_id = dt.launch_prepare(ws, dt.SOURCE_FILE, None, "uploads/raw.jsonl", "", "mine", None, 0.0, 0, "")
    assert job_id and "prepare-data" in card
    job = _wait(ws, job_id)
    assert job.status == "finished", jt.job_runner(ws).log_tail(job_id, 30)
    card, train = dt.poll_job(ws, job_id)
    assert train == "data/mine_train.jsonl" and "6 train / 0 eval rows written, 2 skipped" in card
    smd, sdf = dt.skipped_rows(ws, train)
    assert "2 rows skipped" in smd and sorted(sdf["line"]) == [7, 8]

    table = jt.jobs_table(ws)
    assert list(table["id"]) == [job_id] and list(table["status"]) == ["finished"]
    assert "data" in table["outputs"][0]
    card, log, outs = jt.job_detail(ws, job_id)
    assert 'data-status="finished"' in card and "specforge_core prepare-data" in outs and "**output**" in outs
    assert "already finished" in jt.cancel_job(ws, job_id)
    msg, new = jt.resume_job(ws, job_id)
    assert new is None and "cannot resume" in msg
    assert "no job" in jt.job_detail(ws, "nope")[0]


# ------------------------------------------------------------------------------------------------
# Train tab
# ------------------------------------------------------------------------------------------------
def _train_values(ws, **kw):
    from workbench.tabs import train_tab as tt

    specs = tt.flat_specs()
    vals = {s.name: s.to_widget(tt.gui_default(s)) for s in specs}
    vals.update(kw)
    return [vals[s.name] for s in specs]


def test_train_form_paths_cli_and_saved_config(ws):
    from specforge_core import cli
    from specforge_core.config import build_config, config_from_args, load_config_file
    from specforge_core.training.config import TrainConfig
    from workbench.forms import FormError
    from workbench.tabs import train_tab as tt

    _write_jsonl(ws / "data" / "t.jsonl", [CONV])
    vals = _train_values(ws, train_data="data/t.jsonl", max_steps=3, device="cpu", ttt_length=2)
    cfg = tt.train_config(ws, vals)
    assert cfg.train_data == [str((ws / "data" / "t.jsonl").resolve())]
    assert cfg.output_dir == str((ws / "runs" / "eagle3").resolve()) and cfg.cache_dir == str((ws / "cache").resolve())
    assert cfg.target_model == "default" and cfg.max_steps == 3 and cfg.ttt_length == 2

    with pytest.raises(FormError) as e:
        tt.train_config(ws, _train_values(ws, train_data="data/t.jsonl", output_dir="../elsewhere"))
    assert "outside the workspace" in e.value.errors["output_dir"]
    with pytest.raises(FormError) as e:
        tt.train_config(ws, _train_values(ws, train_data="data/missing.jsonl"))
    assert "no such file" in e.value.errors["train_data"]
    assert "outside the workspace" in tt.launch_train(ws, 1, *_train_values(ws, target_model="/etc"))[0]

    # "Show CLI command": the same config comes back through the real CLI parser.
    text = tt.cli_command(ws, 1, *vals)
    first, cmd = text.split("\n", 1)
    assert first.startswith("cd ") and cmd.startswith("specforge-wb train \\\n    --")
    cmd = cmd.replace(" \\\n    ", " ")  # one flag per line, joined back
    import shlex

    ns = cli.build_parser().parse_args(shlex.split(cmd)[1:])
    assert config_from_args(TrainConfig, ns) == cfg
    assert "torchrun --nproc_per_node 2" in tt.cli_command(ws, 2, *vals)
    # nodes x GPUs: the multi-node torchrun line, the node's rank and node 0's address left to the shell
    multi = tt.cli_command(ws, 8, *vals, nodes=4)
    assert ("torchrun --nnodes 4 --nproc_per_node 8 --node-rank $NODE_RANK --rdzv-endpoint $MASTER_HOST:29500 "
            "-m specforge_core train") in multi
    assert "4 x 8 = 32 processes" in multi and "export NODE_RANK=0 MASTER_HOST=" in multi
    tail = multi.split("specforge_core train", 1)[1].replace(" \\\n    ", " ")
    assert config_from_args(TrainConfig, cli.build_parser().parse_args(["train", *shlex.split(tail)])) == cfg

    # "Save config": YAML in the workspace that `--config` reads back.
    msg = tt.save_config(ws, "configs/run1.yaml", *vals)
    assert "saved configs/run1.yaml" in msg
    assert build_config(TrainConfig, load_config_file(ws / "configs" / "run1.yaml")) == cfg
    assert "outside the workspace" in tt.save_config(ws, "/tmp/x.yaml", *vals)
    assert "end the name" in tt.save_config(ws, "configs/x.txt", *vals)


def test_train_watch_reads_metrics_and_checkpoints(ws):
    from workbench.tabs import train_tab as tt

    run = ws / "runs" / "r"
    _write_jsonl(run / "metrics.jsonl", [
        {"split": "train", "step": 1, "loss": 3.0, "acc_0": 0.2, "acc_1": 0.1, "sim_accept_len": 1.22,
         "tokens_per_s": 100.0},
        {"split": "train", "step": 2, "loss": 2.0, "acc_0": 0.4, "acc_1": 0.2, "sim_accept_len": 1.48,
         "tokens_per_s": 120.0}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st')  # a torn line from a running job
    for step, reason in ((1, "periodic"), (2, "final")):
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": step, "reason": reason}))
        (d / "COMPLETE").write_text("x")
    (run / "checkpoints" / ".tmp_step_00000003_x").mkdir()  # half-written: not listed
    df = tt.checkpoints_table(run)
    assert list(df["checkpoint"]) == ["step_00000001", "step_00000002"] and list(df["reason"]) == ["periodic", "final"]
    from workbench.plots import read_metrics

    s = tt.metrics_summary(read_metrics(run / "metrics.jsonl"))
    assert "step 2" in s and "loss 2.0000" in s and "1.480" in s


def test_train_form_medusa_shows_its_own_fields_and_cli(ws):
    from specforge_core import cli
    from specforge_core.config import config_from_args
    from specforge_core.training.config import TrainConfig
    from workbench.tabs import train_tab as tt

    # Each family's fields are in the form, outside "Advanced", and every TrainConfig medusa_* field is one.
    names = [s.name for s in tt.flat_specs()]
    assert {"draft_type", *tt.FAMILY_FIELDS["eagle3"], *tt.FAMILY_FIELDS["medusa"]} <= set(names)
    assert {n for n in TrainConfig.model_fields if n.startswith("medusa_")} == set(tt.FAMILY_FIELDS["medusa"])
    advanced = {s.name for s in tt.FORM.sections()[-1]}
    assert not advanced & {"draft_type", *tt.FAMILY_FIELDS["eagle3"], *tt.FAMILY_FIELDS["medusa"]}

    _write_jsonl(ws / "data" / "t.jsonl", [CONV])
    # Medusa picked: its fields count; EAGLE3's (hidden) keep their defaults, even when edited before the switch.
    vals = _train_values(ws, train_data="data/t.jsonl", draft_type="medusa", medusa_num_heads=2, medusa_num_layers=2,
                         medusa_decay=0.5, ttt_length=2, aux_layer_ids="1 2 3", output_dir="runs/medusa")
    cfg = tt.train_config(ws, vals)
    assert (cfg.draft_type, cfg.medusa_num_heads, cfg.medusa_num_layers, cfg.medusa_decay) == ("medusa", 2, 2, 0.5)
    assert cfg.ttt_length == TrainConfig.model_fields["ttt_length"].default and cfg.aux_layer_ids is None
    text = tt.cli_command(ws, 1, *vals)
    assert "--draft-type medusa" in text and "--medusa-num-heads 2" in text and "--medusa-decay 0.5" in text
    assert "--ttt-length" not in text and "--aux-layer-ids" not in text
    import shlex

    ns = cli.build_parser().parse_args(shlex.split(text.split("\n", 1)[1].replace(" \\\n    ", " "))[1:])
    assert config_from_args(TrainConfig, ns) == cfg
    # EAGLE3 picked: the Medusa fields (hidden) are left out the same way.
    e3 = tt.train_config(ws, _train_values(ws, train_data="data/t.jsonl", medusa_num_heads=5, ttt_length=2))
    assert e3.draft_type == "eagle3" and e3.ttt_length == 2 and e3.medusa_num_heads == 3
    assert "--draft-type" not in tt.cli_command(ws, 1, *_train_values(ws, train_data="data/t.jsonl"))

    # Switching family shows its box and moves a suggested run dir along; a typed one stays.
    assert tt.family_view("medusa", "runs/eagle3") == ({"eagle3": False, "medusa": True}, "runs/medusa")
    assert tt.family_view("eagle3", "runs/medusa") == ({"eagle3": True, "medusa": False}, "runs/eagle3")
    assert tt.family_view("medusa", "runs/mine") == ({"eagle3": False, "medusa": True}, "runs/mine")


def test_train_watch_names_medusa_heads(ws):
    from workbench.tabs import train_tab as tt

    run = ws / "runs" / "m"
    _write_jsonl(run / "metrics.jsonl", [{"split": "train", "step": 1, "loss": 3.0, "acc_0": 0.25, "acc_1": 0.1,
                                          "sim_accept_len": 1.28}])
    assert tt.run_family(run) == "eagle3" and tt.run_family(run, {"draft_type": "medusa"}) == "medusa"
    (run / "run.json").write_text(json.dumps({"kind": "train-medusa", "config": {}}))
    assert tt.run_family(run, {"draft_type": "eagle3"}) == "medusa"  # what the run wrote wins
    (run / "run.json").write_text(json.dumps({"kind": "train-eagle3"}))
    assert tt.run_family(run, {"draft_type": "medusa"}) == "eagle3"

    # The tab's poll: a Medusa job's curves and summary name heads.
    from specforge_core.jobs.store import Job
    from workbench.common import job_runner

    (run / "run.json").write_text(json.dumps({"kind": "train-medusa"}))
    job = Job(id="20990101-000000-train-medusa1", kind="train", config={"draft_type": "medusa", "output_dir": str(run)},
              argv=[], job_dir=str(ws / "jobs" / "m"), status="finished", nproc=1)
    job_runner(ws).store.add(job)
    _card, _loss, acc, _accept, _ckpts, summary, live = tt.poll_train(ws, job.id)
    assert [t.name for t in acc.data] == ["head 0", "head 1"] and "head 0 acc 0.250" in summary and not live


def test_disk_estimate_uses_the_store_sizes(ws, smol_tokenizer):
    from workbench.tabs import train_tab as tt

    from specforge_core.offline.store import bytes_per_token, human_bytes

    _write_jsonl(ws / "data" / "t.jsonl", _rows(10))
    out = tt.disk_estimate(ws, *_train_values(ws, train_data="data/t.jsonl"))
    toks = sum(_n_tokens(smol_tokenizer, r["conversations"]) for r in _rows(10))
    assert "hidden size 576" in out and f"{toks:,}" in out
    assert human_bytes(toks * bytes_per_token(576, "bfloat16", teacher_fraction=0.5)) in out
    # A Medusa store keeps one H-wide state per token instead of three captured layers.
    med = tt.disk_estimate(ws, *_train_values(ws, train_data="data/t.jsonl", draft_type="medusa"))
    assert "Medusa" in med and human_bytes(toks * bytes_per_token(576, "bfloat16", teacher_fraction=0.5,
                                                                  num_aux_layers=1)) in med


# ------------------------------------------------------------------------------------------------
# Regenerate and Benchmark tabs
# ------------------------------------------------------------------------------------------------
def test_regen_form_and_errors_table(ws):
    from workbench.forms import FormError
    from workbench.tabs import regen_tab as rt

    _write_jsonl(ws / "data" / "in.jsonl", [CONV])
    specs = rt.flat_specs()
    vals = {s.name: s.to_widget(rt.GUI_DEFAULTS.get(s.name, s.default)) for s in specs}
    vals["input"] = "data/in.jsonl"
    cfg = rt.regen_config(ws, [vals[s.name] for s in specs])
    assert cfg.server_address == ["127.0.0.1:30000"] and cfg.output == str((ws / "data" / "regen.jsonl").resolve())
    vals["server_address"] = ""
    with pytest.raises(FormError) as e:
        rt.regen_config(ws, [vals[s.name] for s in specs])
    assert "--server-address" in e.value.errors[""]

    _write_jsonl(ws / "data" / "regen.errors.jsonl", [
        {"id": "a", "server": "s1", "error": "HTTP 500: boom", "attempts": 4, "file": "in.jsonl", "line": 1},
        {"id": "b", "server": "s1", "error": "HTTP 500: bang", "attempts": 4, "file": "in.jsonl", "line": 2}])
    md, df = rt.errors_table(ws / "data" / "regen.errors.jsonl")
    assert "2 failed samples" in md and "HTTP 500 ×2" in md and list(df["id"]) == ["a", "b"]
    assert "No errors file" in rt.errors_table(ws / "nope.jsonl")[0]


def test_bench_results_table_and_charts(ws):
    from workbench.tabs import bench_tab as bt

    from specforge_core.evaluate.bench import ResultStore
    from specforge_core.evaluate.config import BenchConfig

    store = ResultStore(ws / "bench" / "results.json", BenchConfig(server="http://x"))
    store.runs = [
        {"benchmark": "mtbench", "config": "1,0,0,0", "batch": 1, "steps": 0, "status": "ok", "requests": 4,
         "errors": 0, "acceptance_length_pooled": 1.0, "output_tokens_per_s": 50.0},
        {"benchmark": "mtbench", "config": "1,3,1,4", "batch": 1, "steps": 3, "status": "ok", "requests": 4,
         "errors": 0, "acceptance_length_pooled": 2.5, "output_tokens_per_s": 100.0}]
    store.status = "done"
    store.save()
    card, md, df, acc, spd, live = bt.poll_bench(ws, None, "bench/results.json")
    assert not live and "**done** · 2 run(s)" in md and "pooled" in md
    assert list(df["config"]) == ["1,0,0,0", "1,3,1,4"] and list(df["speedup"]) == [1.0, 2.0]
    assert list(df["accept len (pooled)"]) == [1.0, 2.5]
    assert list(acc.data[0].y) == [1.0, 2.5] and list(spd.data[0].y) == [1.0, 2.0]
    assert "outside the workspace" in bt.poll_bench(ws, None, "/etc/results.json")[1]
    # the benchmark set path is jailed like every other path
    specs = bt.flat_specs()
    vals = {s.name: s.to_widget(bt.GUI_DEFAULTS.get(s.name, s.default)) for s in specs}
    vals["benchmark"] = "mtbench:5=../../shared/mt.jsonl"
    from workbench.forms import FormError

    with pytest.raises(FormError) as e:
        bt.bench_config(ws, [vals[s.name] for s in specs])
    assert "outside the workspace" in e.value.errors["benchmark"]
    vals["benchmark"] = "mtbench:5=sets/mt.jsonl"
    cfg = bt.bench_config(ws, [vals[s.name] for s in specs])
    assert cfg.benchmark == [f"mtbench:5={(ws / 'sets' / 'mt.jsonl').resolve()}"]


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------
def test_app_builds_with_every_tab(ws):
    import gradio as gr

    from workbench.app import build_app, load_css
    from workbench.tabs import TAB_MODULES, load_tabs

    assert TAB_MODULES[0] == "mask_tab" and {"data_tab", "train_tab", "regen_tab", "bench_tab", "jobs_tab",
                                             "recipe_tab"} <= set(TAB_MODULES)
    app = build_app(ws)
    labels = [b.label for b in app.blocks.values() if isinstance(b, gr.Tab)]
    assert labels == [m.TITLE for m in load_tabs()]
    assert sum(isinstance(b, gr.Timer) for b in app.blocks.values()) >= 4
    assert ".job-badge" in load_css() and ".tok.trained" in load_css()
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"train-launch", "train-loss-plot", "jobs-table", "jobs-cancel", "data-run", "regen-launch",
            "recipe-launch", "recipe-stages", "recipe-results", "recipe-calibration"} <= ids


def test_elem_ids_are_unique(ws):
    """A button must not take the id of a form field (`<prefix>-<field>`): the page (and every test that
    clicks `#id`) would get two elements, e.g. the Regenerate tab's Resume button and its `resume` field."""
    from collections import Counter

    from workbench.app import build_app

    app = build_app(ws)
    ids = Counter(b.elem_id for b in app.blocks.values() if getattr(b, "elem_id", None))
    assert [i for i, n in ids.items() if n > 1] == []
    assert {"bench-mode", "bench-eval-draft", "data-upload", "data-sample-note", "regen-resume-job"} <= set(ids)


# ------------------------------------------------------------------------------------------------
# Issue 16: a fresh workspace, uploads, the in-process benchmark, the Train form after a reload
# ------------------------------------------------------------------------------------------------
def test_fresh_workspace_gets_the_sample_and_the_tabs_point_at_it(tmp_path):
    from workbench import common
    from workbench.app import build_app
    from workbench.tabs import bench_tab as bt
    from workbench.tabs import data_tab as dt
    from workbench.tabs import train_tab as tt

    fresh = tmp_path / "fresh"
    build_app(fresh)
    sample = fresh / common.SAMPLE_DATA
    # the shipped copy is the notebooks' sample, byte for byte
    repo = Path(__file__).resolve().parent.parent
    assert sample.read_bytes() == (repo / "notebooks" / "assets" / "sample_sharegpt.jsonl").read_bytes()
    assert dt.data_files(fresh) == [common.SAMPLE_DATA]
    assert common.SAMPLE_DATA in dt.sample_note(fresh) and "prepare-data" in dt.sample_note(fresh)
    rows = dt.preview_rows(fresh, common.SAMPLE_DATA)
    assert len(rows) == 20
    # Train trains on what prepare-data writes from it; Benchmark prompts from it, with the shipped draft
    train = tt.workspace_form(fresh)
    assert train.default(next(s for s in tt.flat_specs() if s.name == "train_data")) == [common.SAMPLE_TRAIN]
    ev = bt.workspace_eval_form(fresh)
    by = {s.name: ev.default(s) for s in bt.eval_specs()}
    assert by["prompts"] == common.SAMPLE_DATA and by["draft"] == "default" and by["target"] == "default"
    assert bt.default_mode() == bt.MODE_INPROCESS  # no sglang in this environment

    # a workspace with data of its own, or with jobs, is left alone
    mine = tmp_path / "mine"
    _write_jsonl(mine / "data" / "x.jsonl", [CONV])
    assert common.seed_workspace(mine) is None and not (mine / common.SAMPLE_DATA).exists()
    (tmp_path / "used" / "jobs").mkdir(parents=True)
    assert common.seed_workspace(tmp_path / "used") is None
    assert dt.sample_note(mine) == "" and tt.workspace_form(mine) is tt.FORM


def test_upload_lands_in_the_workspace_under_a_safe_name(ws, tmp_path):
    from workbench import common
    from workbench.security import SecurityError, safe_file_name
    from workbench.tabs import data_tab as dt

    src = _write_jsonl(tmp_path / "incoming" / "x.jsonl", [CONV])
    assert safe_file_name("../../etc/My Data (v2).jsonl") == "My_Data_v2_.jsonl"
    assert safe_file_name("..\\..\\.hidden.jsonl") == "hidden.jsonl"
    assert safe_file_name("ünï.jsonl") == "uni.jsonl"
    with pytest.raises(SecurityError):
        safe_file_name("../..")

    assert common.save_upload(ws, src, "../../evil name.jsonl") == "uploads/evil_name.jsonl"
    # never replaces a file: the second one gets a number
    assert common.save_upload(ws, src, "evil name.jsonl") == "uploads/evil_name-1.jsonl"
    assert (ws / "uploads" / "evil_name.jsonl").read_text() == src.read_text()
    with pytest.raises(common.InputError, match="upload limit"):
        common.save_upload(ws, src, "big.jsonl", max_bytes=10)
    with pytest.raises(common.InputError, match=r"\.jsonl, \.json or \.parquet"):
        common.save_upload(ws, src, "x.sh")
    # a symlinked uploads/ that points out of the workspace is refused by the jail
    other = tmp_path / "elsewhere"
    other.mkdir()
    ws2 = tmp_path / "ws2"
    ws2.mkdir()
    (ws2 / "uploads").symlink_to(other)
    with pytest.raises(common.InputError, match="outside the workspace"):
        common.save_upload(ws2, src)
    assert not list(other.iterdir())

    # the Data tab's handler: several files at once, errors and successes each said
    msg, last = dt.upload_files(ws, [str(src), str(tmp_path / "incoming" / "missing.jsonl")])
    assert last == "uploads/x.jsonl" and "saved uploads/x.jsonl" in msg and "mask-error" in msg
    assert "uploads/x.jsonl" in dt.data_files(ws)
    assert list(dt.preview_rows(ws, last)["id"]) == ["r1"]
    assert "no file received" in dt.upload_files(ws, None)[0]


def test_benchmark_in_process_mode_config_and_results(ws):
    from workbench.forms import FormError
    from workbench.tabs import bench_tab as bt

    # The evaluate job's results JSON (its own shape) in the same table and charts as bench's.
    res = {"kind": "evaluate", "finished": True, "device": "cpu", "dtype": "float32", "prompts": 3,
           "config": {"prompts": str(ws / "data" / "p.jsonl")},
           "baseline": {"config": "baseline", "prompts": 3, "tokens_per_s": 40.0, "wall_s": 1.5,
                        "acceptance_length": None, "acceptance_length_per_request_mean": None},
           "results": [{"config": "1,3,1,4", "prompts": 3, "tokens_per_s": 80.0, "wall_s": 0.75, "speedup": 2.0,
                        "acceptance_length": 2.4, "acceptance_length_per_request_mean": 2.5,
                        "mismatches_vs_baseline": 0}]}
    (ws / "bench").mkdir()
    (ws / "bench" / "evaluate.json").write_text(json.dumps(res))
    card, md, df, acc, spd, live = bt.poll_bench(ws, None, "bench/evaluate.json")
    assert list(df["config"]) == ["1,0,0,0", "1,3,1,4"] and list(df["benchmark"]) == ["p.jsonl"] * 2
    assert list(df["accept len (pooled)"]) == [1.0, 2.4] and list(df["speedup"]) == [1.0, 2.0]
    assert list(df["output tok/s"]) == [40.0, 80.0] and list(df["status"]) == ["ok", "ok"]
    assert list(acc.data[0].y) == [1.0, 2.4] and list(spd.data[0].y) == [1.0, 2.0]
    assert "**done** · in-process · 2 run(s)" in md and "cpu" in md and "pooled" in md

    specs = bt.eval_specs()
    vals = {s.name: s.to_widget(bt.EVAL_FORM.default(s)) for s in specs}
    vals["prompts"] = "data/p.jsonl"
    # the default draft is the shipped one, by name (not a workspace path); the prompts must exist
    assert vals["draft"] == "default"
    with pytest.raises(FormError) as e:
        bt.evaluate_config(ws, [vals[s.name] for s in specs])
    assert set(e.value.errors) == {"prompts"} and "no such file" in e.value.errors["prompts"]
    _write_jsonl(ws / "data" / "p.jsonl", [CONV])
    assert bt.evaluate_config(ws, [vals[s.name] for s in specs]).draft == "default"
    # a draft typed as a path must exist in the workspace (train first), like the prompts
    vals["draft"] = "runs/eagle3"
    with pytest.raises(FormError) as e:
        bt.evaluate_config(ws, [vals[s.name] for s in specs])
    assert set(e.value.errors) == {"draft"} and "no such file" in e.value.errors["draft"]
    (ws / "runs" / "eagle3").mkdir(parents=True)
    cfg = bt.evaluate_config(ws, [vals[s.name] for s in specs])
    assert cfg.target == "default" and cfg.draft == str((ws / "runs" / "eagle3").resolve())
    assert cfg.output == str((ws / "bench" / "evaluate.json").resolve()) and cfg.max_prompts == 8
    vals["output"] = "../out.json"
    msg, jid = bt.launch_benchmark(ws, bt.MODE_INPROCESS, *[None] * len(bt.flat_specs()),
                                   *[vals[s.name] for s in specs])
    assert jid is None and "outside the workspace" in msg and "--output" in msg
    # the SGLang mode still takes the bench form
    bvals = {s.name: s.to_widget(bt.GUI_DEFAULTS.get(s.name, s.default)) for s in bt.flat_specs()}
    bvals["output"] = "../r.json"
    msg, jid = bt.launch_benchmark(ws, bt.MODE_SGLANG, *[bvals[s.name] for s in bt.flat_specs()],
                                   *[vals[s.name] for s in specs])
    assert jid is None and "outside the workspace" in msg


def test_train_form_is_restored_from_the_run_the_tab_shows(ws):
    from specforge_core.jobs.store import Job
    from workbench.common import job_runner, latest_job
    from workbench.tabs import train_tab as tt

    _write_jsonl(ws / "data" / "t.jsonl", [CONV])
    cfg = tt.train_config(ws, _train_values(ws, train_data="data/t.jsonl", max_steps=7, lr=0.003, device="cpu",
                                            output_dir="runs/mine", target_model="default"))
    r = job_runner(ws)
    job = Job(id="20990101-000000-train-abc123", kind="train", config=cfg.model_dump(mode="json"), argv=[],
              job_dir=str(ws / "jobs" / "x"), status="finished", nproc=1)
    r.store.add(job)
    assert latest_job(ws, "train") == job.id and latest_job(ws, ("evaluate", "train")) == job.id
    vals = dict(zip([s.name for s in tt.flat_specs()], tt.restored_values(ws, job.id)))
    assert vals["train_data"] == "data/t.jsonl" and vals["output_dir"] == "runs/mine"
    assert vals["max_steps"] == "7" and vals["lr"] == 0.003 and vals["device"] == "cpu"
    assert vals["cache_dir"] == "cache" and vals["target_model"] == "default"
    # the restored values build the same config again
    assert tt.train_config(ws, tt.restored_values(ws, job.id)) == cfg
    assert tt.restored_values(ws, None) is None and tt.restored_values(ws, "nope") is None


# ------------------------------------------------------------------------------------------------
# Recipe tab (issue 13)
# ------------------------------------------------------------------------------------------------
TINY_RECIPE = {"name": "mini", "description": "a recipe for the tests", "target": "default",
               "params": {"steps": 3, "data": "data/src.jsonl"},
               "prompts": {"sources": [{"path": "${data}"}]}, "train": {"max_steps": "${steps}"}}


def _recipe_job(ws, cfg, status="finished", job_id="20990101-000000-recipe-abc123"):
    from specforge_core.jobs.store import Job
    from workbench.common import job_runner

    job = Job(id=job_id, kind="recipe", config=cfg.model_dump(mode="json"), argv=[],
              job_dir=str(ws / "jobs" / job_id), status=status, nproc=1, cwd=str(ws),
              paths={"output": cfg.output})
    (ws / "jobs" / job_id).mkdir(parents=True, exist_ok=True)
    job_runner(ws).store.add(job)
    return job


def test_recipe_form_builds_the_config_inside_the_workspace(ws, monkeypatch):
    import yaml

    from workbench.forms import FormError
    from workbench.tabs import recipe_tab as rt

    (ws / "my").mkdir()
    (ws / "my" / "mini.yaml").write_text(yaml.safe_dump(TINY_RECIPE, sort_keys=False))
    (ws / "configs").mkdir()
    (ws / "configs" / "train.yaml").write_text("lr: 0.001\n")              # a train config: not a recipe
    assert rt.recipe_choices(ws)[0] == "smollm2-cpu" and rt.workspace_recipes(ws) == ["my/mini.yaml"]

    v = rt.recipe_view(ws, "smollm2-cpu")
    assert "name: smollm2-cpu" in v.yaml and v.output == "recipes/smollm2-cpu" and "2-core CPU" in v.description
    from specforge_core.recipes.run import load_recipe

    epochs = f"epochs={load_recipe('smollm2-cpu').params['epochs']}"   # whatever the shipped recipe says
    assert "data_dir=../shared/data" in v.params.splitlines() and epochs in v.params.splitlines()
    assert v.stages == ["prompts", "answers", "split", "dump", "train", "export", "evaluate"]
    mine = rt.recipe_view(ws, "my/mini.yaml")
    assert mine.params == "steps=3\ndata=data/src.jsonl" and "dump" not in mine.stages
    assert "mask-error" in rt.recipe_view(ws, "nope").description

    # Only changed params become --set; the output defaults to recipes/<name>, resolved in the workspace.
    cfg = rt.recipe_config(ws, "smollm2-cpu", "", v.params.replace(epochs, "epochs=2"), "", "")
    assert cfg.action == "run" and cfg.recipe == "smollm2-cpu" and cfg.set == ["epochs=2"]
    assert cfg.output == str((ws / "recipes" / "smollm2-cpu").resolve())
    assert cfg.restart_from is None and cfg.stop_after is None
    cfg = rt.recipe_config(ws, "my/mini.yaml", "out/m", "steps = 5\n# a comment\n", "train", "export")
    assert cfg.recipe == str((ws / "my" / "mini.yaml").resolve()) and cfg.set == ["steps=5"]
    assert (cfg.restart_from, cfg.stop_after) == ("train", "export") and cfg.output == str((ws / "out" / "m").resolve())

    def errors(*vals):
        with pytest.raises(FormError) as e:
            rt.recipe_config(ws, *vals)
        return e.value.errors

    assert "not a param" in errors("my/mini.yaml", "", "nope=1", "", "")["set"]
    assert "not name=value" in errors("my/mini.yaml", "", "steps", "", "")["set"]
    assert "outside the workspace" in errors("my/mini.yaml", "../x", "", "", "")["output"]
    assert "not a stage of mini" in errors("my/mini.yaml", "", "", "dump", "")["restart_from"]
    assert "outside the workspace" in errors("/etc/passwd", "", "", "", "")["recipe"]
    assert "neither a shipped recipe" in errors("nope", "", "", "", "")["recipe"]
    msg, jid = rt.launch_recipe(ws, "my/mini.yaml", "../x", "", "", "")
    assert jid is None and "--output" in msg and "outside the workspace" in msg

    # A reloaded page shows the form of the run it follows; those values build the same config.
    job = _recipe_job(ws, cfg, status="cancelled")
    vals = rt.restored_values(ws, job.id)
    assert vals == ["my/mini.yaml", "out/m", "steps=5\ndata=data/src.jsonl", "train", "export"]
    assert rt.recipe_config(ws, *vals) == cfg
    assert rt.restored_values(ws, None) is None and rt.restored_values(ws, "nope") is None

    # Resume runs the same config again (without restart-from: finished stages are kept), as a new job.
    sent = {}
    monkeypatch.setattr(rt, "submit_job", lambda w, kind, c, resumed_from=None: sent.update(
        kind=kind, cfg=c, resumed_from=resumed_from) or type("J", (), {"id": "new"})())
    msg, new = rt.resume_recipe(ws, job.id)
    assert new == "new" and sent["kind"] == "recipe" and sent["resumed_from"] == job.id
    assert sent["cfg"]["restart_from"] is None and sent["cfg"]["set"] == ["steps=5"]
    assert "start a recipe first" in rt.resume_recipe(ws, None)[0]


def test_recipe_stage_table_results_and_progress(ws):
    import time

    from specforge_core.recipes.config import RecipeConfig
    from specforge_core.recipes.run import STATE_FILE
    from workbench.tabs import recipe_tab as rt

    out = ws / "recipes" / "mini"
    out.mkdir(parents=True)
    now = time.time()
    (out / STATE_FILE).write_text(json.dumps({"stages": {
        "prompts": {"status": "done", "seconds": 7.7, "result": {"prompts": 12, "duplicates": 1,
                                                                  "benchmark_excluded": 1}},
        "answers": {"status": "done", "seconds": 65.0, "result": {"samples_written": 12, "ok": 10, "truncated": 2,
                                                                   "failed": 0}},
        "split": {"status": "done", "seconds": 0.0, "result": {"written_train": 7, "written_eval": 5}},
        "train": {"status": "running", "started": now - 30}}}))
    stages = ["prompts", "answers", "split", "train", "export", "evaluate"]
    df = rt.stage_table(out, stages, live=True, now=now)
    assert list(df["stage"]) == stages
    assert list(df["status"]) == ["done", "done", "done", "running", "pending", "pending"]
    assert list(df["time"]) == ["7s", "1m05s", "0s", "30s", "", ""]
    assert df["result"][0] == "12 prompts (1 duplicates, 1 benchmark prompts removed)"
    assert df["result"][1] == "12 answers (10 ok, 2 truncated, 0 failed)" and df["result"][2] == "7 train / 5 eval rows"
    # a stage left "running" by a job that is no longer alive is stopped (Resume continues it)
    assert rt.stage_table(out, stages, live=False)["status"][3] == "stopped"
    assert rt.stage_summary("train", {"steps": 3, "best_sim_accept_len": 1.7126}) == \
        "3 steps, best held-out sim. acceptance length 1.713"
    res, cal = rt.results_tables(out)
    assert res.empty and cal.empty and "No results yet" in rt.results_note(ws, out)

    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text(json.dumps({
        "prompts": 2, "device": "cpu", "dtype": "float32", "baseline": {"prompts": 2, "tokens_per_s": 13.9},
        "results": [{"config": "1,2,1,3", "prompts": 2, "acceptance_length": 1.16667, "speedup": 0.8226,
                     "tokens_per_s": 11.43}]}))
    (out / "eval" / "calibration.json").write_text(json.dumps([
        {"config": "1,2,1,3", "simulated_heldout": 1.62890625, "in_process": 1.16667, "ratio": 0.71623,
         "simulated_on_benchmark": 1.1712, "ratio_on_benchmark": 0.99613, "agreement": 1.0, "note": None}]))
    (out / "eval" / "acceptance.html").write_text("<html></html>")
    res, cal = rt.results_tables(out)
    assert list(res["config"]) == ["baseline (no draft)", "1,2,1,3"]
    assert list(res["acceptance length"]) == [1.0, 1.167] and list(res["speedup"]) == [1.0, 0.823]
    assert cal.to_dict("records") == [{"config": "1,2,1,3", "simulated held-out": 1.629, "in-process": 1.167,
                                       "ratio": 0.716, "simulated on benchmark": 1.171, "ratio on benchmark": 0.996,
                                       "verify steps predicted": 1.0, "note": ""}]
    assert "recipes/mini/eval/acceptance.html" in rt.results_note(ws, out)

    # The status card: the job's card, the current stage from its `recipe_stage` events, its own progress.
    cfg = RecipeConfig(action="run", recipe="smollm2-cpu", output=str(out))
    job = _recipe_job(ws, cfg, status="cancelled")
    with open(Path(job.job_dir) / "events.jsonl", "w") as f:
        for rec in ({"event": "recipe_stage", "stage": "split", "index": 3, "stages": 7, "status": "done"},
                    {"event": "recipe_stage", "stage": "dump", "index": 4, "stages": 7, "status": "started"},
                    {"event": "progress", "done": 3, "total": 12, "what": "samples"}):
            f.write(json.dumps(rec) + "\n")
    card, sdf, md, rdf, cdf, live = rt.poll_recipe(ws, job.id)
    assert not live and 'data-status="cancelled"' in card and "3/12 samples" in card
    assert 'data-stage="dump"' in card and "Stage 4 of 7" in card and "width:42.9%" in card
    assert list(sdf["stage"]) == ["prompts", "answers", "split", "dump", "train", "export", "evaluate"]
    assert list(sdf["status"])[3:5] == ["pending", "stopped"] and list(rdf["config"])[1] == "1,2,1,3"
    assert "No job started yet" in rt.poll_recipe(ws, None)[0]


def test_benchmark_summary_shows_the_trainers_view_of_the_same_answers():
    from workbench.tabs import bench_tab as bt

    res = {"kind": "evaluate", "finished": True, "prompts": 3, "device": "cpu", "dtype": "float32",
           "baseline": {"config": "baseline", "prompts": 3, "tokens_per_s": 10.0},
           "results": [{"config": "1,3,1,4", "prompts": 3, "acceptance_length": 1.376, "mismatches_vs_baseline": 0,
                        "teacher_forced": {"acceptance_length": 1.3845, "agreement": 1.0, "anchors": 10,
                                           "replayed_steps": 8},
                        "by_category": {"writing": {"prompts": 2, "acceptance_length": 1.31},
                                        "roleplay": {"prompts": 1, "acceptance_length": 1.52}}},
                       {"config": "1,3,4,8", "prompts": 3, "acceptance_length": 1.58, "mismatches_vs_baseline": 0}]}
    s = bt.results_summary(res, "eval.json")
    assert "1,3,1,4: the trainer's simulated acceptance length on these answers is 1.385 (in process 1.376)" in s
    assert "predicts 100.0% of the verify steps exactly" in s and "1,3,4,8: the trainer" not in s
    assert "1,3,1,4 by category: writing 1.31, roleplay 1.52" in s
