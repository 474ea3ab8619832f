"""The prepare-data job: outputs, skipped-row file, dedup, seeded sampling, the stable train/eval split,
system prompts, cancellation without partial files, speed, and the CLI end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from specforge_core.cli import main
from specforge_core.data.config import PrepareDataConfig
from specforge_core.data.prepare import eval_fraction, prepare_data
from specforge_core.events import Events, JobCancelled, null_events

pytestmark = pytest.mark.unit

FIX = Path(__file__).parent / "fixtures" / "presets"


def conv(rid, user="hi", assistant="hello", system=None):
    turns = [{"role": "system", "content": system}] if system else []
    return {"id": rid, "conversations": turns + [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": assistant}]}


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def run(tmp_path, events=None, **kw) -> dict:
    kw.setdefault("output", str(tmp_path / "out"))
    return prepare_data(PrepareDataConfig(**kw), events or null_events())


def test_outputs_skips_and_summary(tmp_path):
    src = write_jsonl(tmp_path / "mine.jsonl", [conv(f"r{i}") for i in range(40)] + [
        "{broken", {"id": "x", "conversations": [{"role": "user", "content": "q"}]}, conv("r3", user="dup")])
    ev = Events(None, echo=False, progress_interval=0)
    res = run(tmp_path, events=ev, input=[str(src), str(FIX / "daring_anteater.jsonl")], split_eval=0.25, seed=3)
    assert res["name"] == "mine"
    assert res["rows_read"] == 45
    assert res["duplicates"] == 1
    assert res["skipped"] == 2 and res["skipped_by_reason"] == {"bad_json": 1, "no_assistant_turn": 1}
    train, evl = read_jsonl(res["train_path"]), read_jsonl(res["eval_path"])
    assert len(train) + len(evl) == 42 == res["written_train"] + res["written_eval"]
    assert 0 < len(evl) < 42
    by_id = {r["id"]: r for r in train + evl}
    assert by_id["r3"]["conversations"][0]["content"] == "hi"  # first of the duplicates wins
    assert sum(1 for r in train + evl if r["conversations"][0]["role"] == "system") == 1  # Daring-Anteater row
    for r in evl:
        assert eval_fraction(3, r["id"]) < 0.25
    for r in train:
        assert eval_fraction(3, r["id"]) >= 0.25

    skipped = read_jsonl(res["skipped_path"])
    assert [(s["file"], s["line"], s["code"]) for s in skipped] == [(str(src), 41, "bad_json"),
                                                                     (str(src), 42, "no_assistant_turn")]
    assert all(s["message"] for s in skipped)

    summary = json.loads(Path(res["summary_path"]).read_text())
    assert summary["kind"] == "prepare-data" and summary["format_version"] >= 1
    assert summary["config"]["split_eval"] == 0.25 and summary["result"]["written_eval"] == len(evl)
    assert summary["skipped_examples"][0]["line"] == 41

    names = [r["event"] for r in ev.records]
    assert "progress" in names and names[-1] == "summary"
    assert any(r["event"] == "warning" and "2 row(s) skipped" in r["message"] for r in ev.records)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "mine_eval.jsonl", "mine_skipped.jsonl", "mine_summary.json", "mine_train.jsonl"]


def test_output_rows_reread_cleanly(tmp_path):
    from specforge_core.data.readers import SkipReport, read_rows

    res = run(tmp_path, input=[str(FIX / "magpie.jsonl"), str(FIX / "sharegpt.json")], split_eval=0.0, name="mix")
    report = SkipReport()
    rows = read_rows(res["train_path"], report=report, convert=None)
    assert report.total == 0 and len(rows) == res["written_train"] == 5
    assert res["eval_path"] is None and not (tmp_path / "out" / "mix_eval.jsonl").exists()


def test_dedup_first_wins_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [conv("1", user="first"), conv("2")])
    b = write_jsonl(tmp_path / "b.jsonl", [conv("1", user="second"), conv("3"), conv("2")])
    res = run(tmp_path, input=[str(a), str(b)], split_eval=0.0)
    rows = read_jsonl(res["train_path"])
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["conversations"][0]["content"] == "first"
    assert res["duplicates"] == 2 and res["rows_read"] == 5


def test_sample_size_is_seeded_uniform_and_keeps_order(tmp_path):
    src = write_jsonl(tmp_path / "many.jsonl", [conv(f"{i:05d}") for i in range(2000)] + [conv("00001")])

    def sample(seed, n=100):
        res = run(tmp_path, input=[str(src)], sample_size=n, seed=seed, split_eval=0.0, name=f"s{seed}_{n}")
        return [r["id"] for r in read_jsonl(res["train_path"])], res

    a, res = sample(0)
    b, _ = sample(0)
    c, _ = sample(1)
    assert a == b and a != c
    assert len(a) == 100 == len(set(a)) and a == sorted(a)  # source order kept
    assert res["duplicates"] == 1 and res["unique_rows"] == 2000
    # Uniform: the sample is spread over the whole file, not taken from its head.
    idx = [int(x) for x in a + c]
    assert sum(i >= 1000 for i in idx) > 60 and sum(i < 1000 for i in idx) > 60
    everything, _ = sample(0, n=5000)
    assert len(everything) == 2000


def test_split_is_deterministic_stable_when_rows_are_added_and_about_right(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", [conv(f"id-{i}") for i in range(1000)])
    big = write_jsonl(tmp_path / "big.jsonl", [conv(f"id-{i}") for i in range(4000)][::-1])
    r_small = run(tmp_path, input=[str(small)], split_eval=0.1, seed=7)
    r_big = run(tmp_path, input=[str(big)], split_eval=0.1, seed=7)
    ev_small = {r["id"] for r in read_jsonl(r_small["eval_path"])}
    ev_big = {r["id"] for r in read_jsonl(r_big["eval_path"])}
    assert ev_small == {x for x in ev_big if int(x.split("-")[1]) < 1000}
    assert 0.08 < len(ev_big) / 4000 < 0.12
    r_again = run(tmp_path, input=[str(small)], split_eval=0.1, seed=7, name="again")
    assert {r["id"] for r in read_jsonl(r_again["eval_path"])} == ev_small
    r_seed = run(tmp_path, input=[str(small)], split_eval=0.1, seed=8, name="seed8")
    assert {r["id"] for r in read_jsonl(r_seed["eval_path"])} != ev_small


def test_system_prompt_added_only_where_missing(tmp_path):
    src = write_jsonl(tmp_path / "sys.jsonl", [conv("plain"), conv("has", system="Own prompt."),
                                               {"id": "txt", "text": "<|im_start|>user\nhi<|im_end|>"}])
    res = run(tmp_path, input=[str(src), str(FIX / "daring_anteater.jsonl")], system_prompt="Be kind.",
              split_eval=0.0)
    rows = {r["id"]: r for r in read_jsonl(res["train_path"])}
    assert rows["plain"]["conversations"][0] == {"role": "system", "content": "Be kind."}
    assert rows["has"]["conversations"][0] == {"role": "system", "content": "Own prompt."}
    assert [t["role"] for t in rows["has"]["conversations"]] == ["system", "user", "assistant"]
    assert "conversations" not in rows["txt"]
    da = [r for r in rows.values() if r["id"] not in ("plain", "has", "txt")]
    assert sorted(r["conversations"][0]["content"] for r in da) == ["Be kind.", "You are a helpful gardening expert."]


def test_cancel_leaves_previous_outputs_and_no_partial_files(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [conv(f"c{i}") for i in range(5000)])
    first = run(tmp_path, input=[str(src)], name="c", sample_size=10)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    ev = null_events()
    ev.cancel()
    with pytest.raises(JobCancelled):
        run(tmp_path, events=ev, input=[str(src)], name="c")
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert after == before and first["written_train"] + first["written_eval"] == 10


def test_input_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run(tmp_path, input=[str(tmp_path / "nope.jsonl")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not both"):
        run(tmp_path, input=[str(FIX / "magpie.jsonl")], dataset="magpie")
    with pytest.raises(ValueError, match="nothing to prepare"):
        run(tmp_path)
    with pytest.raises(ValueError, match="--source-path needs --dataset"):
        run(tmp_path, input=[str(FIX / "magpie.jsonl")], source_path="x")
    with pytest.raises(ValueError, match="plain file name"):
        run(tmp_path, input=[str(FIX / "magpie.jsonl")], name="../evil")


def test_100k_rows_in_a_few_seconds(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write('{"id": "r%d", "conversations": [{"role": "user", "content": "Question number %d about '
                    'something fairly ordinary?"}, {"role": "assistant", "content": "An answer of modest '
                    'length, %d, with a little detail so the row looks real."}]}\n' % (i, i, i))
    t0 = time.time()
    res = run(tmp_path, input=[str(p)], split_eval=0.05)
    dt = time.time() - t0
    assert res["written_train"] + res["written_eval"] == 100_000 and res["skipped"] == 0
    assert dt < 12, f"{dt:.1f}s for 100k rows"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_end_to_end_on_fixtures(tmp_path, capsys):
    out = tmp_path / "cli_out"
    rc = main(["prepare-data", "--input", str(FIX / "ultrachat.jsonl"), str(FIX / "perfectblend.jsonl"),
               "--output", str(out), "--name", "cli", "--split-eval", "0", "--system-prompt", "Sys.",
               "--json", "--quiet"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["written_train"] == 4 and res["duplicates"] == 1 and res["skipped"] == 1
    rows = read_jsonl(out / "cli_train.jsonl")
    assert [r["id"] for r in rows][:2] == ["uc-0001", "uc-0002"]
    assert all(r["conversations"][0] == {"role": "system", "content": "Sys."} for r in rows)

    rc = main(["prepare-data", "--dataset", "sharegpt", "--source-path", str(FIX / "sharegpt.json"),
               "--output", str(out), "--split-eval", "0.5", "--seed", "1", "--json", "--quiet"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["name"] == "sharegpt" and res["written_train"] + res["written_eval"] == 3
    assert res["skipped_by_reason"] == {"unknown_role": 1}
    assert (out / "sharegpt_summary.json").exists()


def test_cli_unavailable_preset_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    rc = main(["prepare-data", "--dataset", "daring-anteater", "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "nvidia/Daring-Anteater" in err and "--source-path" in err
    assert not out.exists() or not any(out.iterdir())
