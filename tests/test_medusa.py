"""The Medusa draft family: module and offsets, the per-head loss (a tiny-target overfit lifts every head),
the vLLM serving format (names and shapes frozen by a golden list, export -> load round trip, check-draft
naming a renamed or missing head tensor), training through the shared trainer online and offline (the
same loss step by step), the store refusing the other family's states, and `--draft-type` on the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config
from specforge_core.events import null_events, read_events
from specforge_core.data.toy import write_conversations

ROOT = Path(__file__).resolve().parents[1]


def _mapping(ids: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = ids.sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(ids.numel()), t2d


def _draft(V=100, H=16, Vd=40, K=3, L=1, seed=0):
    from specforge_core.models.registry import build_draft, family

    torch.manual_seed(seed)
    tcfg = tiny_llama_config(vocab_size=V, hidden_size=H, num_hidden_layers=2)
    cfg = family("medusa").build_config(tcfg, Vd, None, None, num_heads=K, num_layers=L)
    d = build_draft(cfg)
    ids = torch.randperm(V)[:Vd]
    d.set_vocab_mapping(*_mapping(ids, V))
    return d, cfg, tcfg


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_draft_types_are_the_registry_families():
    from specforge_core.models.registry import family, family_for, family_names
    from specforge_core.training.config import DRAFT_TYPES

    assert tuple(family_names()) == DRAFT_TYPES
    assert family_for("MedusaModel") is family("medusa")
    assert family("medusa").layer_ids({"architectures": ["MedusaModel"]}) is None


@pytest.mark.unit
def test_init_from_target_makes_every_head_the_target_lm_head():
    d, cfg, _ = _draft(K=3, L=2)
    W = torch.randn(100, 16)
    d.init_from_target(W, d.t2d)
    h = torch.randn(2, 5, 16)
    out = d(h)
    assert out.shape == (3, 2, 5, 40)                                     # [K, B, T, Vd]
    ids = d.to_target_ids(torch.arange(40))
    assert torch.equal(ids, torch.nonzero(d.t2d).flatten())
    for i in range(3):
        assert torch.allclose(out[i], h @ W[ids].T, atol=1e-5)
    assert all(float(p.detach().abs().sum()) == 0 for b in d.blocks for p in b.parameters())


# ------------------------------------------------------------------------------------------------
# Loss: offsets and an overfit on a tiny target
# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_head_i_at_t_is_taught_by_the_target_at_t_plus_1_plus_i():
    from specforge_core.training.medusa_loss import medusa_forward

    d, _, _ = _draft(V=50, H=8, Vd=50, K=2)
    d.set_vocab_mapping(torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.bool))
    B, T = 1, 6
    logits = torch.full((B, T, 50), -10.0)
    for t in range(T):
        logits[0, t, 10 + t] = 10.0          # the target's argmax at position t is id 10 + t
    hidden = torch.randn(B, T, 8)
    am = torch.ones(B, T, dtype=torch.long)
    lm = torch.ones(B, T, dtype=torch.long)

    # An oracle whose head i at t outputs the target's logits at t+1+i: accuracy 1 iff that is the
    # teacher the loss pairs it with (any other offset scores 0 here, every argmax being distinct).

    class Oracle(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.num_heads, self.hidden_size, self.vocab_size = 2, 8, 50
            self.t2d, self.d2t, self.blocks = base.t2d, base.d2t, base.blocks

        def to_target_ids(self, x):
            return self.base.to_target_ids(x)

        def head_logits(self, h, i):
            n = h.shape[1]
            return logits[:, 1 + i:1 + i + n] + 0 * h.sum()

    out = medusa_forward(Oracle(d), hidden, logits, lm, am)
    assert out.acc == [1.0, 1.0] and out.counts == [T - 2, T - 3]
    assert out.anchors == T - 2 and out.chain == [T - 2, T - 3]   # every anchor's chain holds while it can
    lm[0, 4] = 0                             # token 4 untrained: head 0 at t=2 and head 1 at t=1 not counted
    out = medusa_forward(Oracle(d), hidden, logits, lm, am)
    assert out.counts == [T - 3, T - 4]
    assert out.anchors == T - 3 and out.chain == [T - 3, T - 5]   # the chain at t=1 breaks at head 1


@pytest.mark.unit
def test_tiny_target_overfit_lifts_every_head(tiny_llama):
    from specforge_core.models.target import Target
    from specforge_core.training.medusa_loss import medusa_forward

    target = Target(tiny_llama, aux=False)
    assert target.layer_ids == []
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 24))
    am = torch.ones_like(ids)
    lm = torch.ones_like(ids)
    cap = target.capture(ids, am)
    assert cap.aux_hidden is None and cap.last_hidden.shape == (2, 24, 64)
    # draft vocab: the target's argmaxes plus padding, so every position counts and d2t is not identity
    want = cap.logits.argmax(-1).unique()
    extra = torch.tensor([i for i in range(512) if i not in set(want.tolist())][: 200 - want.numel()])
    d, _, _ = _draft(V=512, H=64, Vd=200, K=3)
    d.set_vocab_mapping(*_mapping(torch.cat([want, extra]), 512))
    d.init_from_target(target.lm_head_weight().detach(), d.t2d)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    first = medusa_forward(d, cap.last_hidden, cap.logits, lm, am)
    for _ in range(60):
        opt.zero_grad()
        out = medusa_forward(d, cap.last_hidden, cap.logits, lm, am)
        out.loss.backward()
        opt.step()
    last = medusa_forward(d, cap.last_hidden, cap.logits, lm, am)
    assert last.counts == first.counts == [2 * 22, 2 * 21, 2 * 20]
    for i in range(3):
        assert last.acc[i] > first.acc[i] + 0.3 and last.acc[i] > 0.8, (i, first.acc, last.acc)
        assert last.ploss[i] < first.ploss[i]


# ------------------------------------------------------------------------------------------------
# Serving format
# ------------------------------------------------------------------------------------------------
GOLDEN_TENSORS = [  # name, shape: K=3 heads, 2 blocks each, H=16, draft vocab 40 of 100
    ("blocks.0.layers.0.bias", [16]), ("blocks.0.layers.0.weight", [16, 16]),
    ("blocks.0.layers.1.bias", [16]), ("blocks.0.layers.1.weight", [16, 16]),
    ("blocks.1.layers.0.bias", [16]), ("blocks.1.layers.0.weight", [16, 16]),
    ("blocks.1.layers.1.bias", [16]), ("blocks.1.layers.1.weight", [16, 16]),
    ("blocks.2.layers.0.bias", [16]), ("blocks.2.layers.0.weight", [16, 16]),
    ("blocks.2.layers.1.bias", [16]), ("blocks.2.layers.1.weight", [16, 16]),
    ("lm_heads.0.weight", [40, 16]), ("lm_heads.1.weight", [40, 16]), ("lm_heads.2.weight", [40, 16]),
    ("token_map", [40]),
]
GOLDEN_CONFIG = {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": 16, "vocab_size": 100,
                 "num_heads": 3, "num_hidden_layers": 2, "truncated_vocab_size": 40, "draft_vocab_size": 40,
                 "medusa_fc_bias": True, "torch_dtype": "float32"}


def _export(tmp_path: Path, **kw) -> tuple[Path, torch.nn.Module, dict]:
    """A Medusa training checkpoint (as the trainer writes it) exported through the export job."""
    from specforge_core.training.checkpoint import save_checkpoint
    from specforge_core.training.config import ExportConfig
    from specforge_core.training.export import export_draft

    d, cfg, tcfg = _draft(K=3, L=2)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    opt = torch.optim.AdamW(d.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path / "run", 1, d.state_dict(), opt, sched, extra={"reason": "final"},
                    config=cfg.to_dict(), keep_last=1, is_main=True)
    tdir = tmp_path / "target"
    tdir.mkdir(exist_ok=True)
    (tdir / "config.json").write_text(json.dumps(tcfg.to_dict()))
    res = export_draft(ExportConfig(checkpoint=str(tmp_path / "run"), output=str(tmp_path / "serve"),
                                    target=str(tdir), dtype="float32", **kw), null_events())
    return tmp_path / "serve", d, res


@pytest.mark.unit
def test_export_writes_vllm_medusa_format_and_loads_back(tmp_path):
    from safetensors import safe_open

    from specforge_core.models.serving import check_draft_dir, load_draft

    serve, d, res = _export(tmp_path)
    assert res["ok"] and res["draft_vocab_size"] == 40 and res["aux_layer_ids"] is None
    with safe_open(str(serve / "model.safetensors"), framework="pt") as f:
        got = sorted((k, list(f.get_slice(k).get_shape())) for k in f.keys())
        token_map = f.get_tensor("token_map")
    assert got == GOLDEN_TENSORS
    assert token_map.dtype == torch.int64 and torch.equal(token_map, d.to_target_ids(torch.arange(40)))
    cfg = json.loads((serve / "config.json").read_text())
    assert {k: cfg.get(k) for k in GOLDEN_CONFIG} == GOLDEN_CONFIG
    # vLLM's MedusaConfig renames every key with "num" + "heads"/"layers": only ours may be there
    assert sorted(k for k in cfg if "num" in k) == ["num_heads", "num_hidden_layers"]
    assert check_draft_dir(serve) == []
    back, src = load_draft(serve)
    assert src.kind == "serving"
    assert torch.equal(back.d2t, d.d2t) and torch.equal(back.t2d, d.t2d)
    h = torch.randn(2, 3, 16)
    assert torch.allclose(back(h), d(h), atol=1e-5)


@pytest.mark.unit
def test_check_draft_names_a_renamed_or_missing_head_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from specforge_core.models.serving import check_draft_dir
    from specforge_core.training.config import CheckDraftConfig
    from specforge_core.training.export import check_draft

    serve, _, _ = _export(tmp_path)
    state = load_file(str(serve / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((serve / "config.json").read_text())
    renamed = dict(state)
    renamed["lm_heads.5.weight"] = renamed.pop("lm_heads.2.weight")
    del renamed["blocks.1.layers.0.weight"]
    save_file(renamed, str(bad / "model.safetensors"))
    problems = check_draft_dir(bad)
    assert any("'lm_heads.5.weight'" in p and "unknown" in p for p in problems), problems
    assert any("'lm_heads.2.weight'" in p and "missing" in p for p in problems), problems
    assert any("'blocks.1.layers.0.weight'" in p and "missing" in p for p in problems), problems
    res = check_draft(CheckDraftConfig(path=str(bad)), null_events())
    assert res["exit_code"] == 1
    # a token_map that is not ascending target ids, and a config key vLLM would fold into num_heads
    tm = dict(state)
    tm["token_map"] = tm["token_map"].flip(0).contiguous()
    save_file(tm, str(bad / "model.safetensors"))
    cfg = json.loads((serve / "config.json").read_text())
    cfg["medusa_num_heads"] = 5
    (bad / "config.json").write_text(json.dumps(cfg))
    problems = check_draft_dir(bad)
    assert any("token_map" in p and "ascending" in p for p in problems), problems
    assert any("medusa_num_heads" in p for p in problems), problems


# ------------------------------------------------------------------------------------------------
# Training through the shared trainer: online, offline, the store's states
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """A random 4-layer Llama with SmolLM2's tokenizer (vocab 49152): Medusa needs no aux layers, so a
    target too shallow for EAGLE3's default capture layers works."""
    from transformers import LlamaForCausalLM

    from specforge_core.targets import load_tokenizer

    d = tmp_path_factory.mktemp("tiny_target")
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=49152, hidden_size=32, num_hidden_layers=4)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    LlamaForCausalLM(cfg).save_pretrained(d)
    load_tokenizer("default").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_conversations(d / "train.jsonl", 12), write_conversations(d / "eval.jsonl", 4, seed=1)


def train_args(target: Path, train: Path, ev: Path, out: Path, cache: Path, **kw) -> dict:
    # The full vocabulary as the draft vocab: a random target's argmax is anywhere in its 49152 ids.
    args = dict(target_model=str(target), train_data=[str(train)], eval_data=[str(ev)], chat_template="chatml",
                max_length=96, draft_vocab_size=49152, draft_type="medusa", medusa_num_heads=3, lr=3e-3,
                batch_size=2, epochs=1, output_dir=str(out), cache_dir=str(cache), num_proc=1, warmup_ratio=0.1,
                seed=3, device="cpu", eval_every=3)
    args.update(kw)
    return args


def rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in read_events(run_dir / "metrics.jsonl") if r.get("split") == split]


@pytest.mark.unit
def test_medusa_online_equals_offline_step_by_step_and_exports(tmp_path, tiny_target, data_files, monkeypatch):
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import HiddenStateStore, StoreError
    from specforge_core.training.config import CheckDraftConfig, ExportConfig, TrainConfig
    from specforge_core.training.export import check_draft, export_draft
    from specforge_core.training.trainer import train

    train_f, eval_f = data_files
    cache = tmp_path / "cache"
    online = train(TrainConfig(**train_args(tiny_target, train_f, eval_f, tmp_path / "online", cache)), null_events())
    run = json.loads((tmp_path / "online" / "run.json").read_text())
    assert run["kind"] == "train-medusa" and run["draft_config"]["architectures"] == ["MedusaModel"]
    a = rows(tmp_path / "online", "train")
    assert online["steps"] == len(a) == 6
    assert {"acc_0", "acc_1", "acc_2", "ploss_2", "sim_accept_len"} <= set(a[0]) and "acc_3" not in a[0]
    assert all(r["counted_positions"] > 0 for r in a)

    ev = null_events()
    dump = DumpConfig(target_model=str(tiny_target), train_data=[str(train_f)], eval_data=[str(eval_f)],
                      chat_template="chatml", max_length=96, draft_vocab_size=49152, output=str(tmp_path / "hs"),
                      cache_dir=str(cache), num_proc=1, device="cpu", format="float32", teacher="hidden",
                      draft_type="medusa")
    res = dump_hidden_states(dump, ev)
    assert res["states"] == "last" and res["complete"] == {"train": True, "eval": True}
    store = HiddenStateStore(tmp_path / "hs")
    assert store.states == "last" and store.layer_ids == [] and store.run["draft_type"] == "medusa"
    assert store.get("train", 0)["aux"].shape[1] == 32                       # H, not 3H
    est = [r for r in ev.records if r["event"] == "dump_estimate"][0]
    assert est["estimated_bytes"] <= res["bytes"] <= est["estimated_bytes"] + 1024 * len(store.records)
    assert est["bytes_per_token_by_draft_type"]["medusa"] < est["bytes_per_token_by_draft_type"]["eagle3"]

    import specforge_core.models.target as target_mod

    def no_target(*a, **k):
        raise AssertionError("offline training loaded the target model")

    monkeypatch.setattr(target_mod, "load_target", no_target)
    off = dict(train_data=None, eval_data=None, train_hidden_states=str(tmp_path / "hs"))
    train(TrainConfig(**train_args(tiny_target, train_f, eval_f, tmp_path / "offline", cache, **off)), null_events())
    b = rows(tmp_path / "offline", "train")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-6), (x["step"], x["loss"], y["loss"])
        for i in range(3):
            assert y[f"acc_{i}"] == pytest.approx(x[f"acc_{i}"], abs=1e-9)
        assert y["counted_positions"] == x["counted_positions"]
    for x, y in zip(rows(tmp_path / "online", "eval"), rows(tmp_path / "offline", "eval")):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-6)

    # the other family's store is refused, naming the store
    with pytest.raises(StoreError, match=f"{tmp_path / 'hs'}.*last hidden state.*--draft-type eagle3"):
        train(TrainConfig(**train_args(tiny_target, train_f, eval_f, tmp_path / "e3", cache, draft_type="eagle3",
                                       aux_layer_ids=[0, 1, 2], **off)), null_events())

    # export (full draft vocab: no token_map) and check-draft against the target
    out = export_draft(ExportConfig(checkpoint=str(tmp_path / "online"), output=str(tmp_path / "serve"),
                                    target=str(tiny_target)), null_events())
    assert out["ok"] and not (set(json.loads((tmp_path / "serve" / "config.json").read_text())) - {
        "architectures", "model_type", "hidden_size", "vocab_size", "truncated_vocab_size", "draft_vocab_size",
        "num_heads", "num_hidden_layers", "medusa_fc_bias", "torch_dtype", "dtype", "bos_token_id",
        "eos_token_id", "pad_token_id"})
    chk = check_draft(CheckDraftConfig(path=str(tmp_path / "serve"), target=str(tiny_target)), null_events())
    assert chk["ok"], chk["problems"]


@pytest.mark.unit
def test_medusa_run_refuses_an_eagle3_store(tmp_path):
    from specforge_core.offline.store import StoreError, check_store_matches

    aux_store = {"layer_ids": [1, 3, 5]}                       # no `states`: every store before Medusa
    with pytest.raises(StoreError, match="/x/hs.*captured aux layers.*--draft-type medusa"):
        check_store_matches(aux_store, reads_aux=False, draft_type="medusa", where="/x/hs")
    check_store_matches(aux_store, reads_aux=True, draft_type="eagle3", where="/x/hs")
    check_store_matches({"layer_ids": [], "states": "last"}, reads_aux=False, draft_type="medusa", where="/x/hs")


@pytest.mark.unit
def test_cli_lists_draft_type():
    out = subprocess.run([sys.executable, "-m", "specforge_core", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "--draft-type" in text and "medusa" in text and "--medusa-num-heads" in text
    out = subprocess.run([sys.executable, "-m", "specforge_core", "dump-hidden-states", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert "--draft-type" in out.stdout
