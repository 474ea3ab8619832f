"""Offline EAGLE3 training: the hidden-state store, the dump job (estimate, SIGKILL + resume, repair) and
training from disk, which must give the same loss curve as online training on the same data and seed."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config
from specforge_core.events import null_events, read_events
from specforge_core.data.toy import write_conversations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _save_tiny(d: Path, seed: int, vocab_size: int = 49152) -> Path:
    from transformers import LlamaForCausalLM

    from specforge_core.targets import load_tokenizer

    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=8)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    LlamaForCausalLM(cfg).save_pretrained(d)
    load_tokenizer("default").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """A random 8-layer Llama with SmolLM2's real tokenizer (vocab 49152), saved as a local HF folder."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_target"), 0)


@pytest.fixture(scope="module")
def other_target(tmp_path_factory):
    """Same architecture and tokenizer, other weights and a larger vocab: a store from it must be refused."""
    return _save_tiny(tmp_path_factory.mktemp("other_target"), 1, vocab_size=49280)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_conversations(d / "train.jsonl", 16), write_conversations(d / "eval.jsonl", 4, seed=1)


def dump_args(target: Path, train: Path, ev: Path | None, out: Path, cache: Path, **kw) -> dict:
    args = dict(target_model=str(target), train_data=[str(train)], chat_template="chatml", max_length=128,
                draft_vocab_size=512, output=str(out), cache_dir=str(cache), num_proc=1, device="cpu",
                batch_tokens=256, max_batch_size=3)
    if ev is not None:
        args["eval_data"] = [str(ev)]
    args.update(kw)
    return args


def train_args(target: Path, train: Path, ev: Path, out: Path, cache: Path, **kw) -> dict:
    args = dict(target_model=str(target), train_data=[str(train)], eval_data=[str(ev)], chat_template="chatml",
                max_length=128, draft_vocab_size=512, ttt_length=3, lr=3e-3, batch_size=2, epochs=1,
                output_dir=str(out), cache_dir=str(cache), num_proc=1, warmup_ratio=0.1, seed=3, device="cpu",
                eval_every=4)
    args.update(kw)
    return args


def to_argv(args: dict) -> list[str]:
    argv = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


def rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in read_events(run_dir / "metrics.jsonl") if r.get("split") == split]


def assert_same_store(a: Path, b: Path, atol: float = 1e-5) -> None:
    from specforge_core.offline.store import HiddenStateStore

    sa, sb = HiddenStateStore(a), HiddenStateStore(b)
    for split in ("train", "eval"):
        assert sa.indices(split) == sb.indices(split), split
        for i in sa.indices(split):
            x, y = sa.get(split, i), sb.get(split, i)
            assert torch.equal(x["last_pos"], y["last_pos"]), (split, i)
            assert torch.allclose(x["aux"], y["aux"], atol=atol, rtol=1e-5), (split, i)
            for key in ("last", "topk_val", "topk_idx"):   # whichever teacher the store keeps
                assert (key in x) == (key in y), key
                if key in x:
                    assert torch.allclose(x[key].double(), y[key].double(), atol=atol, rtol=1e-5), (split, i, key)


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_bytes_per_token_for_known_configs():
    from specforge_core.offline.store import bytes_per_token, specforge_bytes_per_token

    H = 4096  # Llama-3-8B
    assert specforge_bytes_per_token(H) == 8 * H + 16 == 32784
    # every position keeps a teacher row: 3H + H values in bf16, plus a 4-byte position
    assert bytes_per_token(H, "bfloat16", 1.0) == 8 * H + 4
    assert bytes_per_token(H, "float32", 1.0) == 16 * H + 4
    # typical chat data: half the positions teach; fp8 aux lands at half of SpecForge's bytes
    assert bytes_per_token(H, "bfloat16", 0.5) == 7 * H + 2
    assert bytes_per_token(H, "fp8_e4m3", 0.5) == 3 * H + 6 + H + 2 == specforge_bytes_per_token(H) / 2


@pytest.mark.unit
def test_teacher_positions_are_the_ones_before_trained_tokens():
    from specforge_core.offline.store import teacher_positions

    assert teacher_positions([0, 0, 1, 1, 0, 1]).tolist() == [1, 2, 4]
    assert teacher_positions([1]).tolist() == []


# ------------------------------------------------------------------------------------------------
# Dump + offline training == online training
# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_offline_training_matches_online_and_loads_no_target(tmp_path, tiny_target, data_files, monkeypatch):
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import HiddenStateStore
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    train_f, eval_f = data_files
    cache = tmp_path / "cache"
    online = train(TrainConfig(**train_args(tiny_target, train_f, eval_f, tmp_path / "online", cache)), null_events())

    ev = null_events()
    res = dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, eval_f, tmp_path / "hs", cache,
                                                    format="float32", teacher="hidden", shard_mb=0.05)), ev)
    names = [r["event"] for r in ev.records]
    assert names.index("dump_estimate") < names.index("dump_start")  # the estimate comes first
    assert res["complete"] == {"train": True, "eval": True} and res["samples"] == {"train": 16, "eval": 4}
    store = HiddenStateStore(tmp_path / "hs")
    assert len(list((tmp_path / "hs" / "shards").glob("*.safetensors"))) > 2
    # the estimate is the payload; the only extra bytes are the shard headers
    est = [r for r in ev.records if r["event"] == "dump_estimate"][0]
    assert est["estimated_bytes"] <= res["bytes"] <= est["estimated_bytes"] + 1024 * len(store.records)
    assert est["teacher_fraction"] < 1.0  # only positions before trained tokens keep the last hidden state

    # offline: the target's decoder is never loaded
    import specforge_core.models.target as target_mod

    def no_target(*a, **k):
        raise AssertionError("offline training loaded the target model")

    monkeypatch.setattr(target_mod, "load_target", no_target)
    offline = train(TrainConfig(**train_args(tiny_target, train_f, eval_f, tmp_path / "offline", cache,
                                             train_data=None, eval_data=None,
                                             train_hidden_states=str(tmp_path / "hs"))), null_events())
    assert offline["steps"] == online["steps"] == 8
    a, b = rows(tmp_path / "online", "train"), rows(tmp_path / "offline", "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5), (x["step"], x["loss"], y["loss"])
        assert y["acc_0"] == pytest.approx(x["acc_0"], abs=1e-6)
        assert y["counted_positions"] == x["counted_positions"]
    ea, eb = rows(tmp_path / "online", "eval"), rows(tmp_path / "offline", "eval")
    assert len(ea) == len(eb) >= 2
    for x, y in zip(ea, eb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5)
    assert json.loads((tmp_path / "offline" / "run.json").read_text())["mode"] == "offline"

    # resume works as online: a second offline run resumes from the final checkpoint without error
    again = train(TrainConfig(**train_args(tiny_target, train_f, eval_f, tmp_path / "offline", cache,
                                           train_data=None, eval_data=None, resume=True, max_steps=8,
                                           train_hidden_states=str(tmp_path / "hs"))), null_events())
    assert again["steps"] == 8


@pytest.mark.unit
def test_store_from_another_target_or_data_is_refused(tmp_path, tiny_target, other_target, data_files):
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import StoreError, check_store_matches, read_journal
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    train_f, eval_f = data_files
    cache = tmp_path / "cache"
    dump_hidden_states(DumpConfig(**dump_args(other_target, train_f, None, tmp_path / "hs", cache)), null_events())
    assert read_journal(tmp_path / "hs")
    base = train_args(tiny_target, train_f, eval_f, tmp_path / "run", cache, eval_data=None, max_steps=1,
                      train_hidden_states=str(tmp_path / "hs"))
    with pytest.raises(StoreError, match="made from target"):
        train(TrainConfig(**base), null_events())
    run = json.loads((tmp_path / "hs" / "run.json").read_text())
    with pytest.raises(StoreError, match="target vocab of 49280"):
        check_store_matches(run, vocab_size=49152)
    # right target, other data: the cache key differs
    other_data = write_conversations(tmp_path / "other.jsonl", 6, seed=7)
    with pytest.raises(StoreError, match="tokenised cache"):
        train(TrainConfig(**{**base, "target_model": str(other_target), "train_data": [str(other_data)],
                             "output_dir": str(tmp_path / "run2")}), null_events())
    # resuming a dump into that store with another target is refused too
    with pytest.raises(StoreError, match="other inputs"):
        dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, None, tmp_path / "hs", cache)),
                           null_events())


@pytest.mark.unit
def test_estimate_only_and_disk_refusal(tmp_path, tiny_target, data_files, monkeypatch):
    import specforge_core.offline.dump as dump_mod
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import estimate_bytes

    train_f, _ = data_files
    args = dump_args(tiny_target, train_f, None, tmp_path / "hs", tmp_path / "cache", format="bfloat16",
                     teacher="hidden")
    est = dump_hidden_states(DumpConfig(**args, estimate=True), null_events())
    assert est["estimate_only"] and not (tmp_path / "hs" / "run.json").exists()
    H = 32
    # recompute from the cache: every token keeps 3H bf16 values, each taught position H more + 4
    from specforge_core.data.cache import load_cache

    ds = load_cache(next(p for p in (tmp_path / "cache").iterdir() if (p / "done").exists())).train
    lengths = [len(x) for x in ds["input_ids"]]
    trows = [sum(m[1:]) for m in ds["loss_mask"]]
    assert est["tokens"] == sum(lengths) and est["teacher_rows"] == sum(trows)
    assert est["estimated_bytes"] == sum(lengths) * 6 * H + sum(trows) * (2 * H + 4) + 24 * len(lengths)
    assert est["estimated_bytes"] == estimate_bytes(lengths, trows, H, "bfloat16")
    monkeypatch.setattr(dump_mod, "_free_bytes", lambda p: 1000)
    with pytest.raises(ValueError, match="free"):
        dump_hidden_states(DumpConfig(**args), null_events())
    res = dump_hidden_states(DumpConfig(**args, force=True), null_events())
    assert res["complete"] == {"train": True}


@pytest.mark.unit
def test_fp8_format_is_smaller_and_close(tmp_path, tiny_target, data_files):
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import HiddenStateStore

    train_f, _ = data_files
    cache = tmp_path / "cache"
    r16 = dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, None, tmp_path / "bf16", cache,
                                                    format="bfloat16", teacher="hidden")), null_events())
    r8 = dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, None, tmp_path / "fp8", cache,
                                                   format="fp8_e4m3", teacher="hidden")), null_events())
    assert r8["bytes"] < 0.8 * r16["bytes"]
    a, b = HiddenStateStore(tmp_path / "bf16"), HiddenStateStore(tmp_path / "fp8")
    for i in a.indices("train"):
        x, y = a.get("train", i)["aux"], b.get("train", i)["aux"]
        rel = (x - y).norm() / x.norm()
        assert rel < 0.06, (i, float(rel))  # e4m3 has a 3-bit mantissa: ~3% rms error
        assert torch.equal(a.get("train", i)["last"], b.get("train", i)["last"])  # last stays bf16


@pytest.mark.unit
def test_onednn_bf16_dump_is_close_to_the_fp32_one_and_says_so(tmp_path, tiny_target, data_files):
    from specforge_core.cpu_kernels import onednn_bf16_available
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import HiddenStateStore

    if not onednn_bf16_available():
        pytest.skip("this CPU has no native oneDNN bf16")
    train_f, _ = data_files
    cache = tmp_path / "cache"
    ev = null_events()
    for name, kernel in (("fp32", "native"), ("packed", "onednn-bf16")):
        dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, None, tmp_path / name, cache, format="float32",
                                                  teacher="hidden", linear_kernel=kernel)), ev)
        assert json.loads((tmp_path / name / "run.json").read_text())["linear_kernel"] == kernel
    assert [r["linear_kernel"] for r in ev.records if r["event"] == "dump_start"] == ["native", "onednn-bf16"]
    a, b = HiddenStateStore(tmp_path / "fp32"), HiddenStateStore(tmp_path / "packed")
    for i in a.indices("train"):
        for key in ("aux", "last"):
            x, y = a.get("train", i)[key], b.get("train", i)[key]
            rel = float((x - y).norm() / x.norm())
            assert 0 < rel < 0.02, (i, key, rel)   # bf16 inputs and weights (8-bit mantissa), fp32 accumulation


# ------------------------------------------------------------------------------------------------
# Crash safety
# ------------------------------------------------------------------------------------------------
def _cli(args: dict, env: dict | None = None, wait: bool = True, command: str = "dump-hidden-states"):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    p = subprocess.Popen([sys.executable, "-m", "specforge_core", command, "--quiet", "--json", *to_argv(args)],
                         cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.unit
@pytest.mark.slow
def test_sigkill_mid_dump_then_resume_gives_the_same_store(tmp_path, tiny_target, data_files):
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import read_journal

    train_f, eval_f = data_files
    cache = tmp_path / "cache"
    dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, eval_f, tmp_path / "ref", cache,
                                              shard_mb=0.02)), null_events())

    run = dump_args(tiny_target, train_f, eval_f, tmp_path / "hs", cache, shard_mb=0.02, max_batch_size=1)
    est = _cli(run, command="estimate-dump")  # the CLI's estimate command, end to end
    assert est["estimate_only"] and est["samples"] == 20
    kill_after = random.Random().randint(1, 6)
    p = _cli(run, env={"SPECFORGE_DUMP_SLEEP": "0.15"}, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and len(read_journal(tmp_path / "hs")) < kill_after:
        time.sleep(0.01)
    assert p.poll() is None, "the dump finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    committed = {(r["split"], i) for r in read_journal(tmp_path / "hs") for i in r["indices"]}
    assert 0 < len(committed) < 20
    # what a crash can leave: a temp shard and a renamed shard whose journal line never made it
    shards = tmp_path / "hs" / "shards"
    (shards / ".tmp-train-999998.safetensors").write_bytes(b"half a shard")
    (shards / "train-999999.safetensors").write_bytes(b"renamed, never committed")
    with open(tmp_path / "hs" / "manifest.jsonl", "a") as f:
        f.write('{"shard": "train-99')  # a torn journal line
    res = _cli(run)
    assert res["complete"] == {"train": True, "eval": True}
    assert res["tokens_this_run"] > 0
    assert sorted(x.name for x in shards.iterdir() if x.name.startswith((".tmp", "train-9999"))) == []
    assert_same_store(tmp_path / "ref", tmp_path / "hs")


@pytest.mark.unit
def test_truncated_or_corrupt_shard_is_named_and_repaired(tmp_path, tiny_target, data_files):
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import HiddenStateStore, StoreError, read_journal

    train_f, _ = data_files
    args = dump_args(tiny_target, train_f, None, tmp_path / "hs", tmp_path / "cache", shard_mb=0.02)
    dump_hidden_states(DumpConfig(**args), null_events())
    import shutil

    shutil.copytree(tmp_path / "hs", tmp_path / "ref")
    recs = read_journal(tmp_path / "hs")
    victim = tmp_path / "hs" / "shards" / recs[1]["shard"]
    # a flipped byte in the payload: the reader's crc32 check names the shard
    blob = bytearray(victim.read_bytes())
    blob[-5] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match=recs[1]["shard"] + ".*crc32"):
        HiddenStateStore(tmp_path / "hs").get("train", recs[1]["indices"][0])
    # truncated: the dump refuses to resume over it and says --repair
    victim.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(StoreError, match=recs[1]["shard"] + ".*--repair"):
        dump_hidden_states(DumpConfig(**args), null_events())
    res = dump_hidden_states(DumpConfig(**args, repair=True), null_events())
    assert res["complete"] == {"train": True} and res["tokens_this_run"] == sum(recs[1]["lengths"])
    assert_same_store(tmp_path / "ref", tmp_path / "hs")


@pytest.mark.unit
def test_cancel_leaves_a_resumable_store(tmp_path, tiny_target, data_files):
    from specforge_core.events import Events, JobCancelled
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import HiddenStateStore

    class CancelAfter(Events):
        """Asks to stop at the third check, as a GUI cancel (SIGTERM) would mid-dump."""

        def __init__(self):
            super().__init__(None, echo=False)
            self.checks = 0

        @property
        def cancelled(self) -> bool:
            if any(r["event"] == "dump_start" for r in self.records):  # the cache build checks too
                self.checks += 1
            return self.checks > 2

    train_f, _ = data_files
    args = dump_args(tiny_target, train_f, None, tmp_path / "hs", tmp_path / "cache", max_batch_size=2)
    with pytest.raises(JobCancelled, match="run again to resume"):
        dump_hidden_states(DumpConfig(**args), CancelAfter())
    st = HiddenStateStore(tmp_path / "hs")
    assert len(st.indices("train")) == 4  # two batches of two, flushed before stopping
    res = dump_hidden_states(DumpConfig(**args), null_events())
    assert res["complete"] == {"train": True} and res["samples"] == {"train": 16}


@pytest.mark.unit
def test_writer_skips_are_committed_and_training_rows_exclude_them(tmp_path):
    from specforge_core.offline.store import HiddenStateStore, StoreWriter
    from specforge_core.training.trainer import _store_rows

    d = tmp_path / "hs"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"kind": "hidden-states", "format_version": 1, "config": {},
                                            "store_format": 1, "format": "bfloat16", "hidden_size": 4,
                                            "layer_ids": [0, 1, 2]}))
    w = StoreWriter(d, "bfloat16", 3)
    for i in (0, 2, 3):
        w.put("train", i, torch.full((5, 12), float(i)), torch.tensor([1, 3]), torch.ones(2, 4) * i)
    w.skip("train", 1, "non-finite hidden states")
    w.finish({"train": True})
    st = HiddenStateStore(d)
    assert st.indices("train") == [0, 2, 3]
    aux, last = st.batch("train", [3, 0], 6)
    assert aux.shape == (2, 6, 12) and float(aux[0, 4, 0]) == 3.0 and float(aux[0, 5, 0]) == 0.0
    assert last[0, :, 0].tolist() == [0, 3, 0, 3, 0, 0]
    assert _store_rows(st, "train", 4, "x") == [0, 2, 3]   # 1 was skipped on purpose
    with pytest.raises(ValueError, match="unfinished"):
        _store_rows(st, "train", 5, "x")                    # 4 was never dumped
    with pytest.raises(Exception, match="tokenised cache"):
        st.batch("train", [0], 8, lengths=[6])


# ------------------------------------------------------------------------------------------------
# Top-k teacher: the target's top-k logits instead of its last hidden state (no lm_head needed)
# ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_topk_rows_rebuild_the_renormalised_top_of_the_distribution():
    from specforge_core.offline.store import bytes_per_token, teacher_row_bytes, topk_logits, topk_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 300, generator=g) * 4 + 20.0     # offset: the stored values are shifted
    vals, ids = topk_rows(logits, 16)
    assert vals.dtype == torch.float16 and ids.dtype == torch.int32 and vals.shape == (5, 7, 16)
    assert torch.all(vals[..., 0] == 0) and torch.all(vals[..., 1:] <= 0)   # best first, max at 0
    rebuilt = topk_logits(vals, ids, 300)
    assert torch.isfinite(rebuilt).all()
    assert torch.equal(rebuilt.argmax(-1), logits.argmax(-1))
    # softmax of the rebuilt logits = the target's softmax renormalised over its top 16
    p = torch.softmax(logits, -1)
    top = torch.zeros_like(p).scatter(-1, ids.long(), 1.0).bool()
    want = torch.where(top, p, torch.zeros_like(p))
    want = want / want.sum(-1, keepdim=True)
    assert torch.allclose(torch.softmax(rebuilt, -1), want, atol=2e-3)
    # sizes: k fp16 values + k int32 ids + a position, independent of H (no lm_head either)
    assert teacher_row_bytes(4096, "bfloat16", "topk", 64) == 64 * 6 + 4
    assert bytes_per_token(4096, "fp8_e4m3", 0.5, teacher="topk", topk=64) == 3 * 4096 + 6 + 0.5 * 388


@pytest.mark.unit
def test_topk_store_round_trip_and_batch(tmp_path):
    from specforge_core.offline.store import HiddenStateStore, StoreWriter, estimate_bytes, topk_logits, topk_rows

    d = tmp_path / "hs"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"kind": "hidden-states", "format_version": 1, "config": {},
                                            "store_format": 2, "format": "fp8_e4m3", "hidden_size": 4,
                                            "layer_ids": [0, 1, 2], "teacher": "topk", "topk": 8,
                                            "vocab_size": 50}))
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(d, "fp8_e4m3", 3, shard_bytes=300, teacher="topk", topk=8)   # tiny shards: several
    samples = {}
    for i in range(5):
        T = 4 + i
        pos = torch.arange(1, T - 1, dtype=torch.int32)
        logits = torch.randn(len(pos), 50, generator=g) * 3
        aux = torch.randn(T, 12, generator=g)
        samples[i] = (aux, pos, logits, topk_rows(logits, 8))
        w.put("train", i, aux, pos, topk=samples[i][3])
    with pytest.raises(Exception, match="top-k rows"):
        w.put("train", 9, torch.zeros(3, 12), torch.tensor([1]), topk=(torch.zeros(1, 4), torch.zeros(1, 4)))
    w.finish({"train": True})
    st = HiddenStateStore(d)
    assert st.teacher == "topk" and len(st.records) > 1 and st.manifest()["topk"] == 8
    paid = sum(r["bytes"] for r in st.records)
    lengths = [4 + i for i in range(5)]
    est = estimate_bytes(lengths, [n - 2 for n in lengths], 4, "fp8_e4m3", teacher="topk", topk=8)
    assert est <= paid <= est + 1024 * len(st.records)
    for i, (aux, pos, logits, (v, ix)) in samples.items():
        s = st.get("train", i)
        assert "last" not in s and torch.equal(s["last_pos"], pos.long())
        assert torch.equal(s["topk_val"], v) and torch.equal(s["topk_idx"], ix.long())
        assert torch.allclose(s["aux"], aux, rtol=0.07, atol=0.02)   # fp8 aux
    aux, (vals, ids) = st.batch("train", [4, 0], 9)
    assert aux.shape == (2, 9, 12) and vals.shape == ids.shape == (2, 9, 8)
    rebuilt = topk_logits(vals, ids, 50)
    assert torch.equal(rebuilt[0, 1:7].argmax(-1), samples[4][2].argmax(-1))
    # positions without a teacher row (0, the last, padding) rebuild to uniform logits, never NaN
    assert torch.isfinite(rebuilt).all() and torch.all(rebuilt[0, 0] == rebuilt[0, 0, 0])
    assert torch.all(rebuilt[1, 3:] == rebuilt[1, 3:, :1])


@pytest.mark.unit
def test_topk_position_with_no_draft_token_is_not_counted():
    """A position whose k stored ids all lie outside the draft vocab: its teacher over the draft vocab is
    empty. With -inf fill the TTT loss turns NaN; the rebuilt logits keep it finite and the position is
    skipped exactly as if its loss mask were 0."""
    from specforge_core.models.eagle3 import build_draft_config
    from specforge_core.models.registry import build_draft
    from specforge_core.offline.store import topk_logits, topk_rows
    from specforge_core.models.ttt import ttt_forward

    V, VD, H, T = 64, 16, 32, 12
    torch.manual_seed(0)
    draft = build_draft(build_draft_config(tiny_llama_config(vocab_size=V, hidden_size=H), VD, [1, 1, 2]))
    in_draft = torch.arange(0, 2 * VD, 2)                 # even ids are the draft vocab
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[in_draft] = True
    draft.set_vocab_mapping(in_draft - torch.arange(VD), t2d)
    draft.load_embedding(torch.randn(V, H))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (1, T), generator=g)
    am = torch.ones(1, T, dtype=torch.long)
    lm = torch.ones(1, T, dtype=torch.long)
    lm[0, :2] = 0
    aux = torch.randn(1, T, 3 * H, generator=g)
    logits = torch.randn(1, T, V, generator=g)
    logits[..., t2d] += 3.0                               # most top ids are draft ids ...
    bad = 5                                               # ... but at teacher row 5 the top 4 are all odd ids
    logits[0, bad] = -10.0
    logits[0, bad, [1, 3, 5, 7]] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    vals, idx = topk_rows(logits, 4)
    rebuilt = topk_logits(vals, idx, V)

    with torch.no_grad():
        got = ttt_forward(draft, ids, aux, rebuilt, lm, am, ttt_length=3)
    assert math.isfinite(float(got.loss)) and all(math.isfinite(x) for x in got.ploss)
    # teacher row `bad` teaches token bad+1 at step 0, bad+1 at step 1 too (row t+1+k): masking those
    # predicted tokens out must give the very same numbers
    lm2 = lm.clone()
    lm2[0, bad + 1] = 0
    with torch.no_grad():
        ref = ttt_forward(draft, ids, aux, rebuilt, lm2, am, ttt_length=3)
    assert got.counts == ref.counts and got.counts[0] > 0
    assert got.ploss == pytest.approx(ref.ploss, rel=1e-6) and got.acc == ref.acc
    # with the row's other ids inside the draft vocab it would have been counted
    ok = rebuilt.clone()
    ok[0, bad, 2] = 10.0
    with torch.no_grad():
        assert ttt_forward(draft, ids, aux, ok, lm, am, ttt_length=3).counts[0] == got.counts[0] + 1
    # -inf outside the top-k (no floor): the row with no draft token is all -inf over the draft vocab, a NaN
    # teacher row; it is never counted and the loss reads counted rows only, so it cannot leak into the loss
    # (the floor stays finite anyway, for any other reader of the row)
    inf = torch.full((1, T, V), float("-inf")).scatter(-1, idx.long(), vals.float())
    with torch.no_grad():
        assert math.isfinite(float(ttt_forward(draft, ids, aux, inf, lm, am, ttt_length=3).loss))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_teacher_in_draft_vocab_equals_the_dense_rebuild(dtype):
    """The TTT reads a top-k store's ids straight into the draft vocab (no [B, T, V] tensor): its teacher,
    argmax and every TTT output must equal what the rebuilt dense logits give, bit for bit - with ties at
    the top (bf16 makes more), rows the store keeps no teacher for, and rows whose ids all miss the draft vocab."""
    from specforge_core.models.eagle3 import build_draft_config
    from specforge_core.models.registry import build_draft
    from specforge_core.offline.store import TopKLogits, topk_logits, topk_rows
    from specforge_core.models.ttt import draft_teacher, ttt_forward

    V, VD, H, B, T, K = 64, 16, 32, 2, 14, 6
    torch.manual_seed(0)
    draft = build_draft(build_draft_config(tiny_llama_config(vocab_size=V, hidden_size=H), VD, [1, 1, 2]))
    in_draft = torch.randperm(V)[:VD].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[in_draft] = True
    draft.set_vocab_mapping(in_draft - torch.arange(VD), t2d)
    draft.load_embedding(torch.randn(V, H))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g) * 3
    logits[..., t2d] += 2.0
    logits[0, 3, [40, 7, 22]] = 20.0                      # a three-way tie at the top: argmax is id 7
    logits[1, 4] = -5.0
    logits[1, 4, ~t2d] = torch.linspace(1.0, 2.0, int((~t2d).sum()))   # every top id outside the draft vocab
    vals, ids = topk_rows(logits, K)
    vals, ids = vals.to(dtype), ids.long()
    vals[1, 9:] = torch.finfo(dtype).min                  # rows the store keeps no teacher for
    ids[1, 9:] = 0
    sparse = TopKLogits(vals, ids, V, dtype)
    dense = topk_logits(vals, ids, V, dtype)
    assert sparse.shape == tuple(dense.shape) and torch.equal(sparse.dense(), dense)

    got_logits, got_arg = draft_teacher(sparse, draft.t2d)
    want_logits, want_arg = draft_teacher(dense, draft.t2d)
    assert got_logits.dtype == want_logits.dtype and torch.equal(got_logits, want_logits)
    assert torch.equal(got_arg, want_arg) and int(got_arg[0, 3]) == 7 and not bool(t2d[got_arg[1, 4]])

    ids_in = torch.randint(0, V, (B, T), generator=g)
    aux = torch.randn(B, T, 3 * H, generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 12:] = 0
    lm = torch.ones(B, T, dtype=torch.long)
    lm[:, :2] = 0
    a = ttt_forward(draft, ids_in, aux, sparse, lm, am, ttt_length=3)
    b = ttt_forward(draft, ids_in, aux, dense, lm, am, ttt_length=3)
    assert torch.equal(a.loss, b.loss) and a.ploss == b.ploss and a.acc == b.acc
    assert a.counts == b.counts and a.chain == b.chain and a.anchors == b.anchors and a.counts[0] > 0


@pytest.mark.unit
def test_topk_dump_trains_offline_without_lm_head(tmp_path, tiny_target, data_files, monkeypatch):
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import HiddenStateStore, TargetHead
    from specforge_core.training.config import TrainConfig
    from specforge_core.training.trainer import train

    train_f, eval_f = data_files
    cache = tmp_path / "cache"
    ref = dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, eval_f, tmp_path / "f32", cache,
                                                    format="float32", teacher="hidden")), null_events())
    ev = null_events()
    res = dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, eval_f, tmp_path / "tk", cache,
                                                    format="float32", teacher="topk", topk=16)), ev)
    est = [r for r in ev.records if r["event"] == "dump_estimate"][0]
    assert est["teacher"] == "topk" and est["estimated_bytes"] <= res["bytes"]
    assert res["bytes"] < ref["bytes"]                   # 16 x 6 bytes < H=32 x 4 bytes per teacher row
    # what the dump stored is the top-k of the logits the lm_head gives from the exact last hidden state
    head = TargetHead(str(tiny_target))
    a, b = HiddenStateStore(tmp_path / "f32"), HiddenStateStore(tmp_path / "tk")
    for i in a.indices("train")[:4]:
        x, y = a.get("train", i), b.get("train", i)
        assert torch.equal(x["last_pos"], y["last_pos"]) and torch.equal(x["aux"], y["aux"])
        full = head.logits_from_hidden(x["last"])
        v, ix = torch.topk(full, 16, dim=-1)
        assert torch.equal(y["topk_idx"][:, 0], ix[:, 0])
        assert torch.allclose(y["topk_val"].float(), v - v[:, :1], atol=2e-3)
    # resuming with another k is refused
    with pytest.raises(Exception, match="topk 16 vs 8"):
        dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, eval_f, tmp_path / "tk", cache,
                                                  format="float32", teacher="topk", topk=8)), null_events())

    import specforge_core.models.target as target_mod
    import specforge_core.offline.store as store_mod

    def no_target(*a, **k):
        raise AssertionError("offline training loaded the target model")

    real_read = store_mod._read_tensor

    def no_head(lookup, suffixes):
        assert "lm_head.weight" not in suffixes, "a top-k store needs no lm_head"
        return real_read(lookup, suffixes)

    monkeypatch.setattr(target_mod, "load_target", no_target)
    monkeypatch.setattr(store_mod, "_read_tensor", no_head)
    kw = dict(train_data=None, eval_data=None, max_steps=6, eval_every=0,
              draft_vocab_size=49152)  # every argmax is in the draft vocab, so positions are counted
    tk = train(TrainConfig(**train_args(tiny_target, train_f, eval_f, tmp_path / "run-tk", cache,
                                        train_hidden_states=str(tmp_path / "tk"), **kw)), null_events())
    monkeypatch.setattr(store_mod, "_read_tensor", real_read)   # the hidden-teacher run needs the lm_head
    hid = train(TrainConfig(**train_args(tiny_target, train_f, eval_f, tmp_path / "run-f32", cache,
                                         train_hidden_states=str(tmp_path / "f32"), **kw)), null_events())
    assert tk["steps"] == hid["steps"] == 6
    x, y = rows(tmp_path / "run-f32", "train"), rows(tmp_path / "run-tk", "train")
    assert all(math.isfinite(r["loss"]) for r in y)
    # same aux states, same initial draft, same target argmax: the first step counts and scores alike;
    # the truncated teacher then changes the loss (and the trajectory) a little
    assert y[0]["counted_positions"] == x[0]["counted_positions"] > 0
    assert y[0]["acc_0"] == pytest.approx(x[0]["acc_0"], abs=1e-9)
    assert y[0]["loss"] != x[0]["loss"]
    assert math.isfinite(tk["eval"]["loss"]) and tk["eval"]["sim_accept_len"] >= 1.0


def _torchrun_dump(args: dict, nproc: int = 2, env: dict | None = None, wait: bool = True):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + (os.getpid() + int(time.time())) % 2000), "-m", "specforge_core", "dump-hidden-states",
           "--quiet", "--json", *to_argv(args)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    results = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return next(r for r in results if "complete" in r)   # rank 0's: the whole store


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (torchrun starts its workers in sessions of their own), and wait
    until they are gone (their output lock with them)."""
    def children(p: int) -> list[int]:
        out = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == p:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
        return out

    tree, todo = [], [pid]
    while todo:
        q = todo.pop()
        tree.append(q)
        todo += children(q)
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    for q in tree[1:]:
        while time.time() < deadline:
            try:
                state = (Path("/proc") / str(q) / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state == "Z":
                break
            time.sleep(0.02)


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds torchrun's workers through /proc")
def test_two_rank_dump_equals_one_rank_dump_and_resumes(tmp_path, tiny_target, data_files):
    """torchrun: the ranks split the samples into one store (each its own shards, one manifest) equal to a
    one-process dump; a parallel dump killed mid-way resumes (here at one rank) to the same store."""
    from specforge_core.offline.config import DumpConfig
    from specforge_core.offline.dump import dump_hidden_states
    from specforge_core.offline.store import read_journal

    train_f, eval_f = data_files
    cache = tmp_path / "cache"
    kw = dict(shard_mb=0.02, format="float32", teacher="hidden")
    dump_hidden_states(DumpConfig(**dump_args(tiny_target, train_f, eval_f, tmp_path / "ref", cache, **kw)),
                       null_events())
    res = _torchrun_dump(dump_args(tiny_target, train_f, eval_f, tmp_path / "par", cache, **kw))
    assert res["complete"] == {"train": True, "eval": True}
    shards = sorted(p.name for p in (tmp_path / "par" / "shards").iterdir())
    assert any("-r0-" in s for s in shards) and any("-r1-" in s for s in shards), shards
    assert not list((tmp_path / "par").glob("manifest.r*.jsonl"))   # merged into the one manifest
    assert {r["shard"] for r in read_journal(tmp_path / "par")} == set(shards)
    assert_same_store(tmp_path / "ref", tmp_path / "par")

    # killed mid-way (rank journals not merged yet), then resumed by one process
    run = dump_args(tiny_target, train_f, eval_f, tmp_path / "hs", cache, max_batch_size=1, **kw)
    p = _torchrun_dump(run, env={"SPECFORGE_DUMP_SLEEP": "0.3"}, wait=False)
    hs = tmp_path / "hs"
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if sum(len(read_journal(hs, j.name)) for j in hs.glob("manifest.r*.jsonl")) >= 3:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the dump finished before it could be killed"
    _kill_tree(p.pid)                  # the launcher and both ranks, mid-shard
    p.wait()
    assert list(hs.glob("manifest.r*.jsonl"))   # what the ranks committed is still only in their journals
    res = _cli(run)
    assert res["complete"] == {"train": True, "eval": True}
    assert 0 < res["tokens_this_run"]
    assert_same_store(tmp_path / "ref", hs)
