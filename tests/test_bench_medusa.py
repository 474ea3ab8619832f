"""SGLang has no Medusa: `bench` (with --launch or --server), `serve_command` and the Benchmark tab refuse
a Medusa draft up front, before a server starts or a results file is written, and point to `evaluate`
(in-process) or vLLM <= 0.32; an EAGLE3 draft passes the same check."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from specforge_core.config import ConfigError
from specforge_core.evaluate import launcher
from specforge_core.evaluate.bench import bench
from specforge_core.evaluate.config import BenchConfig
from specforge_core.evaluate.launcher import draft_family_name, serve_command, sglang_refusal
from specforge_core.events import null_events

pytestmark = pytest.mark.unit


def _draft_dir(path: Path, arch: str) -> Path:
    """A serving-looking draft dir; only config.json's architectures matter to the refusal."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": [arch]}), encoding="utf-8")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _prompts(path: Path) -> Path:
    path.write_text(json.dumps({"prompt": "q"}) + "\n", encoding="utf-8")
    return path


def test_refusal_names_sglang_evaluate_and_vllm(tmp_path):
    medusa = _draft_dir(tmp_path / "medusa", "MedusaModel")
    eagle = _draft_dir(tmp_path / "eagle", "LlamaForCausalLMEagle3")
    assert draft_family_name(medusa) == "medusa" and draft_family_name(eagle) == "eagle3"
    why = sglang_refusal(medusa)
    assert "SGLang has no Medusa support" in why and "evaluate" in why and "vLLM <= 0.32" in why
    assert sglang_refusal(eagle) is None
    assert sglang_refusal(tmp_path / "missing") is None   # unreadable: the loader says why, later


@pytest.mark.parametrize("mode", ["launch", "server"])
def test_bench_refuses_medusa_before_anything_starts(tmp_path, monkeypatch, mode):
    medusa = _draft_dir(tmp_path / "medusa", "MedusaModel")
    started = []
    monkeypatch.setattr(launcher.LaunchedServer, "start", lambda self: started.append(self) or self)
    # Refused even where sglang is missing: the Medusa message comes first, not "install sglang".
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "r.json"
    kw = {"launch": True, "target": "T"} if mode == "launch" else {"server": "http://127.0.0.1:9"}
    cfg = BenchConfig(draft=str(medusa), benchmark=[f"prompts={_prompts(tmp_path / 'p.jsonl')}"],
                      config_list=["1,0,0,0", "1,3,1,4"], output=str(out), **kw)
    with pytest.raises(ConfigError, match="SGLang has no Medusa support.*evaluate.*vLLM <= 0.32"):
        bench(cfg, null_events())
    assert not started and not out.exists()


def test_serve_command_by_family():
    with pytest.raises(ValueError, match="SGLang has no Medusa support"):
        serve_command("T", "/d", steps=3, family="medusa")
    argv = shlex.split(serve_command("T", "/d", steps=3, engine="vllm", family="medusa"))
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == {
        "method": "medusa", "model": "/d", "num_speculative_tokens": 3}


@pytest.mark.parametrize("launch", [True, False])
def test_benchmark_tab_refuses_medusa_in_sglang_mode(tmp_path, launch):
    from workbench.forms import FormError
    from workbench.tabs import bench_tab as bt

    ws = tmp_path / "ws"
    _draft_dir(ws / "runs" / "medusa", "MedusaModel")
    _draft_dir(ws / "runs" / "eagle", "LlamaForCausalLMEagle3")
    specs = bt.flat_specs()
    vals = {s.name: s.to_widget(bt.GUI_DEFAULTS.get(s.name, s.default)) for s in specs}
    vals.update(draft="runs/medusa", target="default")
    if launch:
        vals.update(launch=True, server="")
    with pytest.raises(FormError) as e:
        bt.bench_config(ws, [vals[s.name] for s in specs])
    msg = e.value.errors["draft"]
    assert "SGLang has no Medusa support" in msg and bt.MODE_INPROCESS in msg
    vals["draft"] = "runs/eagle"
    cfg = bt.bench_config(ws, [vals[s.name] for s in specs])
    assert cfg.draft == str((ws / "runs" / "eagle").resolve())
