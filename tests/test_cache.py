"""The tokenised cache (`build-cache`): keying, reuse, dropped samples, workers, vocab checks, CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from specforge_core.data.config import BuildCacheConfig
from specforge_core.data.cache import DONE, build_cache, cache_key, load_cache
from specforge_core.data.mask import mask
from specforge_core.data.vocab import VocabMismatchError, build_vocab_mapping, count_tokens
from specforge_core.events import JobCancelled, null_events

pytestmark = pytest.mark.unit

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def _conv(i: int, turns: int = 1) -> dict:
    conv = [{"role": "system", "content": "You are terse."}] if i % 3 == 0 else []
    for t in range(turns):
        conv.append({"role": "user", "content": f"Question {i}.{t}: say {WORDS[(i + t) % 10]} twice."})
        conv.append({"role": "assistant", "content": f"{WORDS[(i + t) % 10]} {WORDS[(i + t) % 10]} ({i * 7 + t})"})
    return {"id": f"s{i}", "conversations": conv}


def _write(path: Path, rows: list, extra_lines: list[str] = ()) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


@pytest.fixture
def data_file(tmp_path):
    rows = [_conv(i, turns=1 + i % 2) for i in range(24)]
    return _write(tmp_path / "train.jsonl", rows, ['{"id": "broken"', '{"id": "noturns", "conversations": []}'])


def _cfg(tmp_path, data, **kw) -> BuildCacheConfig:
    base = dict(data=[str(data)], cache_dir=str(tmp_path / "cache"), tokenizer="default", chat_template="chatml",
                max_length=256, num_proc=1, draft_vocab_size=200)
    base.update(kw)
    return BuildCacheConfig(**base)


def test_build_then_reuse_is_instant_and_matches_mask_api(tmp_path, data_file, smol_tokenizer):
    ev = null_events()
    s1 = build_cache(_cfg(tmp_path, data_file), ev)
    assert s1["reused"] is False
    assert s1["train_samples"] == 24 and s1["eval_samples"] == 0
    assert s1["skipped"] == 2 and s1["dropped_all_zero"] == 0
    path = Path(s1["path"])
    assert path.name == s1["key"] and (path / DONE).exists() and (path / "run.json").exists()
    run = json.loads((path / "run.json").read_text())
    assert run["kind"] == "build-cache" and run["key"] == s1["key"] and run["summary"]["coverage"] == s1["coverage"]
    # the reader's skips were reported with file and line
    warn = [r for r in ev.records if r["event"] == "warning" and "skipped 2" in r["message"]]
    assert warn and any("train.jsonl:25" in e for e in warn[0]["examples"])

    t = time.perf_counter()
    s2 = build_cache(_cfg(tmp_path, data_file), null_events())
    assert time.perf_counter() - t < 1.0
    assert s2["reused"] is True and s2["path"] == s1["path"] and s2["key"] == s1["key"]
    assert {k: v for k, v in s2.items() if k != "reused"} == {k: v for k, v in s1.items() if k != "reused"}

    lc = load_cache(s1["path"])
    assert lc.path == path and lc.eval is None and len(lc.train) == 24
    assert lc.train.features["input_ids"].feature.dtype == "int32"
    assert lc.train.features["loss_mask"].feature.dtype == "int8"
    # every stored sample is exactly what the mask API gives for that row
    rows = {r["id"]: r for r in (json.loads(x) for x in data_file.read_text().splitlines()[:24])}
    total = trained = 0
    for rec in lc.train:
        ms = mask(rows[rec["id"]], smol_tokenizer, "chatml", 256)
        assert rec["input_ids"] == ms.input_ids and rec["loss_mask"] == ms.loss_mask
        assert rec["length"] == len(ms.input_ids) and rec["num_trained"] == ms.num_trained > 0
        total += len(ms.input_ids)
        trained += ms.num_trained
    assert s1["tokens"] == total and s1["trained_tokens"] == trained
    # the saved vocab is the one built independently from the masked tokens
    expect = build_vocab_mapping(count_tokens(lc.train["input_ids"], lc.train["loss_mask"], 49152), 200)
    assert torch.equal(lc.vocab.d2t, expect.d2t) and torch.equal(lc.vocab.t2d, expect.t2d)
    assert lc.vocab.target_vocab_size == 49152 and lc.vocab.draft_vocab_size == 200
    assert s1["coverage"] == pytest.approx(expect.coverage)
    assert 0.5 < s1["coverage"] <= 1.0


def test_key_changes_with_content_length_template_and_last_turn(tmp_path, data_file):
    def key(**kw):
        a = dict(data_files=[str(data_file)], tokenizer_name_or_dir="default", template="chatml", max_length=256,
                 train_only_last_turn=False, extra=None)
        a.update(kw)
        return cache_key(**a)

    k0 = key()
    assert key() == k0  # deterministic
    assert key(max_length=512) != k0
    assert key(template="auto") != k0
    assert key(train_only_last_turn=True) != k0
    assert key(tokenizer_name_or_dir="llama3") != k0
    assert key(extra={"x": 1}) != k0

    # same size, same mtime, different bytes: only the content hash can tell
    st = data_file.stat()
    raw = data_file.read_bytes()
    i = raw.index(b"alpha")
    data_file.write_bytes(raw[:i] + b"ALPHA" + raw[i + 5:])
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data_file.stat().st_size == st.st_size and data_file.stat().st_mtime_ns == st.st_mtime_ns
    assert key() != k0
    data_file.write_bytes(raw)
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key() == k0


def test_content_hash_memo_is_used_but_not_for_racy_files(tmp_path):
    from specforge_core.data.cache import HASH_MEMO, file_identity

    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (2 << 20))
    memo: dict = {}
    file_identity(big, memo)
    assert memo == {}  # just written: its mtime cannot be trusted yet
    old = time.time_ns() - 60 * 10**9
    os.utime(big, ns=(old, old))
    a = file_identity(big, memo)
    assert memo[str(big.resolve())]["sha256"] == a["sha256"]
    # a memo hit returns the remembered hash without reading the file
    memo[str(big.resolve())]["sha256"] = "remembered"
    assert file_identity(big, memo)["sha256"] == "remembered"
    # the memo file is written beside the caches by cache_key
    cache_key([str(big)], "default", "chatml", 64, False, memo_dir=tmp_path / "c")
    assert (tmp_path / "c" / HASH_MEMO).exists()


def test_build_keys_differ_for_different_inputs(tmp_path, data_file):
    a = build_cache(_cfg(tmp_path, data_file), null_events())
    b = build_cache(_cfg(tmp_path, data_file, max_length=128), null_events())
    assert a["key"] != b["key"] and not b["reused"]
    _write(data_file, [_conv(i) for i in range(5)])
    c = build_cache(_cfg(tmp_path, data_file), null_events())
    assert c["key"] != a["key"] and c["train_samples"] == 5 and not c["reused"]


def test_all_zero_samples_dropped_and_counted(tmp_path):
    rows = [_conv(i) for i in range(6)]
    long_user = "word " * 200
    for j in range(3):  # the assistant turn lies past max_length: nothing left to train on
        rows.append({"id": f"zero{j}", "conversations": [{"role": "user", "content": long_user},
                                                         {"role": "assistant", "content": "ok"}]})
    f = _write(tmp_path / "z.jsonl", rows)
    ev = null_events()
    s = build_cache(_cfg(tmp_path, f, max_length=64), ev)
    assert s["dropped_all_zero"] == 3 and s["train_samples"] == 6
    w = [r for r in ev.records if r["event"] == "warning" and "all zero" in r["message"]]
    assert len(w) == 1 and w[0]["count"] == 3 and sorted(w[0]["ids"]) == ["zero0", "zero1", "zero2"]
    lc = load_cache(s["path"])
    assert not any(i.startswith("zero") for i in lc.train["id"])
    assert all(n > 0 for n in lc.train["num_trained"])


def test_num_proc_two_matches_one(tmp_path, data_file):
    s1 = build_cache(_cfg(tmp_path / "a", data_file, num_proc=1), null_events())
    s2 = build_cache(_cfg(tmp_path / "b", data_file, num_proc=2), null_events())
    assert s1["key"] == s2["key"]  # num_proc does not shape the data
    a, b = load_cache(s1["path"]), load_cache(s2["path"])
    assert a.train.to_dict() == b.train.to_dict()
    assert torch.equal(a.vocab.d2t, b.vocab.d2t) and torch.equal(a.vocab.t2d, b.vocab.t2d)
    assert {k: v for k, v in s1.items() if k != "path"} == {k: v for k, v in s2.items() if k != "path"}


def test_eval_split_cached_beside_train(tmp_path, data_file):
    ev_file = _write(tmp_path / "eval.jsonl", [_conv(100 + i) for i in range(4)])
    s = build_cache(_cfg(tmp_path, data_file, eval_data=[str(ev_file)]), null_events())
    assert s["eval_samples"] == 4
    lc = load_cache(s["path"])
    assert len(lc.eval) == 4 and sorted(lc.eval["id"]) == ["s100", "s101", "s102", "s103"]
    assert (Path(s["path"]) / "eval").is_dir()
    # the eval files are part of the key
    s2 = build_cache(_cfg(tmp_path, data_file), null_events())
    assert s2["key"] != s["key"]


def test_mismatched_vocab_refused(tmp_path, data_file):
    s = build_cache(_cfg(tmp_path, data_file), null_events())
    path = Path(s["path"])
    meta = json.loads((path / "vocab.json").read_text())
    meta["key"] = "0" * 24
    (path / "vocab.json").write_text(json.dumps(meta))
    with pytest.raises(VocabMismatchError) as ei:
        load_cache(path)
    msg = str(ei.value)
    assert str(path / "vocab.json") in msg and "0" * 24 in msg and s["key"] in msg
    meta["key"] = s["key"]
    (path / "vocab.json").write_text(json.dumps(meta))
    with pytest.raises(VocabMismatchError, match="target vocab size is 49152, expected 128256"):
        load_cache(path, expect_target_vocab=128256)
    assert load_cache(path, expect_target_vocab=49152, expect_draft_vocab=200).vocab.draft_vocab_size == 200


def test_draft_vocab_size_change_reuses_tokens_and_rebuilds_vocab(tmp_path, data_file):
    s1 = build_cache(_cfg(tmp_path, data_file, draft_vocab_size=200), null_events())
    ev = null_events()
    s2 = build_cache(_cfg(tmp_path, data_file, draft_vocab_size=10), ev)
    assert s2["reused"] and s2["key"] == s1["key"] and s2["draft_vocab_size"] == 10
    assert any(r["event"] == "vocab_rebuild" for r in ev.records)
    lc = load_cache(s2["path"], expect_draft_vocab=10)
    assert int(lc.vocab.t2d.sum()) == 10 and s2["coverage"] == pytest.approx(lc.vocab.coverage)
    assert s2["coverage"] < s1["coverage"]
    with pytest.raises(ValueError, match="larger than the target vocabulary"):
        build_cache(_cfg(tmp_path, data_file, draft_vocab_size=49153), null_events())


def test_cancel_and_incomplete_dirs_leave_no_finished_cache(tmp_path, data_file):
    cfg = _cfg(tmp_path, data_file)
    ev = null_events()
    ev.cancel()
    with pytest.raises(JobCancelled):
        build_cache(cfg, ev)
    root = Path(cfg.cache_dir)
    assert not [p for p in root.iterdir() if p.is_dir()]  # no key dir, no temp dir left behind
    # a key directory without its `done` marker (a crash from an older layout) is rebuilt, not reused
    s = build_cache(cfg, null_events())
    (Path(s["path"]) / DONE).unlink()
    s2 = build_cache(cfg, null_events())
    assert not s2["reused"] and (Path(s2["path"]) / DONE).exists()
    with pytest.raises(FileNotFoundError, match="not a finished tokenised cache"):
        load_cache(tmp_path)


def test_missing_file_and_unknown_template_are_clear(tmp_path, data_file):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_cache(_cfg(tmp_path, tmp_path / "nope.jsonl"), null_events())
    with pytest.raises(ValueError, match="unknown chat template 'klingon'"):
        build_cache(_cfg(tmp_path, data_file, chat_template="klingon"), null_events())


def test_cli_end_to_end(tmp_path, data_file, capsys):
    from specforge_core.cli import main

    argv = ["build-cache", "--data", str(data_file), "--cache-dir", str(tmp_path / "cache"), "--chat-template",
            "chatml", "--draft-vocab-size", "300", "--num-proc", "1", "--max-length", "256", "--json", "--quiet"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["reused"] is False and out["train_samples"] == 24 and out["draft_vocab_size"] == 300
    lc = load_cache(out["path"])
    assert int(lc.vocab.t2d.sum()) == 300
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["reused"] is True and again["path"] == out["path"]
    # a bad draft size is a clean error exit, not a traceback
    assert main(argv[:7] + ["--draft-vocab-size", "999999", "--quiet"]) == 1
    assert "larger than the target vocabulary" in capsys.readouterr().err
    ids = np.asarray(lc.train["input_ids"][0])
    assert ids.dtype.kind == "i"


def test_mask_errors_are_counted_by_reason_in_the_worker_function():
    from specforge_core.data.cache import _mask_batch

    rows = [_conv(1), {"id": "nothing"}, _conv(2)]
    out = _mask_batch({"row": [json.dumps(r) for r in rows]}, tokenizer="default", template="chatml",
                      max_length=256, last_turn=False)
    assert out["status"] == ["ok", "error", "ok"]
    assert out["id"] == ["s1", "nothing", "s2"]
    assert "neither 'conversations' nor 'text'" in out["detail"][1]
    assert out["input_ids"][1] == [] and out["length"][0] == len(out["input_ids"][0]) > 0


def test_auto_template_builds_too(tmp_path, data_file):
    s = build_cache(_cfg(tmp_path, data_file, chat_template="auto", train_only_last_turn=True), null_events())
    assert s["train_samples"] == 24 and s["trained_tokens"] > 0
    lc = load_cache(s["path"])
    # only the last assistant turn is trained: one contiguous run of ones per sample
    for lm in lc.train["loss_mask"]:
        runs = np.flatnonzero(np.diff(np.concatenate([[0], lm, [0]])) == 1)
        assert len(runs) == 1
