"""Dataset presets: each converts its source schema (a fixture file per preset) into ours; source
schemas are recognised in plain --input files; a preset whose source is not local fails fast and clearly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from specforge_core.data.presets import PRESETS, Preset, auto_convert, detect_preset, get_preset, register
from specforge_core.data.sources import SourceUnavailable, iter_source_records
from specforge_core.data.readers import SkipReport, normalize_records, read_rows

pytestmark = pytest.mark.unit

FIX = Path(__file__).parent / "fixtures" / "presets"


def preset_rows(name: str, path: Path, report: SkipReport | None = None) -> list[dict]:
    p = get_preset(name)
    return list(normalize_records(iter_source_records(p, str(path)), report, convert=p.convert))


def roles(row):
    return [t["role"] for t in row["conversations"]]


def test_registry_has_the_five_presets_with_hub_ids():
    assert {"ultrachat", "sharegpt", "perfectblend", "daring-anteater", "magpie"} <= set(PRESETS)
    assert get_preset("ultrachat").hub_id == "HuggingFaceH4/ultrachat_200k"
    assert get_preset("ultrachat").split == "train_sft"
    assert get_preset("Daring_Anteater").hub_id == "nvidia/Daring-Anteater"
    with pytest.raises(ValueError, match="unknown dataset preset 'nope'.*sharegpt"):
        get_preset("nope")


def test_ultrachat():
    report = SkipReport()
    rows = preset_rows("ultrachat", FIX / "ultrachat.jsonl", report)
    assert [r["id"] for r in rows] == ["uc-0001", "uc-0002"]
    assert roles(rows[0]) == ["user", "assistant", "user", "assistant"]
    assert rows[0]["conversations"][3]["content"].startswith("Yellow lower leaves")
    assert report.examples == [{"file": str(FIX / "ultrachat.jsonl"), "line": 3, "code": "no_assistant_turn",
                                "message": report.examples[0]["message"]}]


def test_sharegpt_drops_leading_assistant_turns_and_keeps_system():
    report = SkipReport()
    rows = preset_rows("sharegpt", FIX / "sharegpt.json", report)
    assert [r["id"] for r in rows] == ["sg-1", "sg-2", "sg-3"]
    assert roles(rows[0]) == ["user", "assistant"]
    assert rows[0]["conversations"][1]["content"].count("\n") == 2
    assert roles(rows[1]) == ["user", "assistant"]  # the leading "gpt" continuation is gone
    assert rows[1]["conversations"][0]["content"].startswith("Summarise")
    assert roles(rows[2]) == ["system", "user", "assistant"]
    assert rows[2]["conversations"][0]["content"] == "You are a terse assistant."
    # sg-4 has a "narrator" turn: skipped, reported at the line where the element starts.
    assert [(e["line"], e["code"]) for e in report.examples] == [(16, "unknown_role")]


def test_perfectblend_hash_ids_are_stable_and_duplicates_share_one():
    rows = preset_rows("perfectblend", FIX / "perfectblend.jsonl")
    assert len(rows) == 3 and roles(rows[0]) == ["user", "assistant"]
    assert rows[0]["id"] == rows[2]["id"] != rows[1]["id"]  # same content -> same id (dedup catches it)
    assert rows == preset_rows("perfectblend", FIX / "perfectblend.jsonl")


def test_daring_anteater_system_field_becomes_a_system_turn():
    rows = preset_rows("daring-anteater", FIX / "daring_anteater.jsonl")
    assert len(rows) == 2
    assert rows[0]["conversations"][0] == {"role": "system", "content": "You are a helpful gardening expert."}
    assert roles(rows[0]) == ["system", "user", "assistant"]
    assert roles(rows[1]) == ["user", "assistant", "user", "assistant"]  # empty system: no turn
    assert rows[1]["conversations"][3]["content"] == "Buenos días."
    assert rows[0]["id"] != rows[1]["id"]


def test_magpie_conversations_and_instruction_response():
    report = SkipReport()
    rows = preset_rows("magpie", FIX / "magpie.jsonl", report)
    assert [r["id"] for r in rows] == ["mp-aaaa", "mp-bbbb"]
    assert rows[1]["conversations"] == [{"role": "user", "content": "List two uses of vinegar at home."},
                                        {"role": "assistant", "content": "Descaling a kettle and cleaning windows."}]
    assert [(e["line"], e["code"]) for e in report.examples] == [(3, "empty_turn")]


def test_converter_failure_is_a_skip_not_a_crash(tmp_path):
    p = tmp_path / "weird.jsonl"
    p.write_text('{"uuid": "x", "foo": 1}\n{"uuid": "y", "conversations": "not a list"}\n'
                 '{"uuid": "z", "instruction": "q", "response": "a"}\n')
    report = SkipReport()
    rows = preset_rows("magpie", p, report)
    assert [r["id"] for r in rows] == ["z"]
    assert [(e["line"], e["code"]) for e in report.examples] == [(1, "missing_field"), (2, "bad_turn")]


def test_auto_detection_of_source_schemas_in_input_files():
    da = read_rows(FIX / "daring_anteater.jsonl")
    assert da[0]["conversations"][0]["role"] == "system"
    mp = read_rows(FIX / "magpie.jsonl")
    assert [r["id"] for r in mp] == ["mp-aaaa", "mp-bbbb"]
    uc = read_rows(FIX / "ultrachat.jsonl")
    assert [r["id"] for r in uc] == ["uc-0001", "uc-0002"]
    # Plain --input ShareGPT keeps a leading assistant turn: only the preset knows the scrape's quirk.
    sg = read_rows(FIX / "sharegpt.json")
    assert roles(sg[1]) == ["assistant", "user", "assistant"]

    ours = {"id": "o", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert detect_preset(ours) is None and auto_convert(ours) is ours
    assert detect_preset({"system": "s", "conversations": []}).name == "daring-anteater"
    assert detect_preset({"instruction": "q", "response": "a"}).name == "magpie"
    assert detect_preset({"prompt": "q", "prompt_id": "1", "messages": []}).name == "ultrachat"
    assert detect_preset({"conversations": [{"from": "human", "value": "q"}], "source": "s"}).name == "perfectblend"


def test_parquet_source_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = [json.loads(x) for x in (FIX / "ultrachat.jsonl").read_text().splitlines()]
    d = tmp_path / "ultrachat_200k" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(src), d / "train_sft-00000-of-00001.parquet")
    rows = preset_rows("ultrachat", tmp_path / "ultrachat_200k")
    assert [r["id"] for r in rows] == ["uc-0001", "uc-0002"]


def test_saved_to_disk_dataset(tmp_path):
    import datasets

    src = [json.loads(x) for x in (FIX / "magpie.jsonl").read_text().splitlines()]
    src = [{"uuid": r["uuid"], "instruction": r.get("instruction", "q"), "response": r.get("response", "a")}
           for r in src]
    datasets.Dataset.from_list(src).save_to_disk(str(tmp_path / "saved"))
    rows = preset_rows("magpie", tmp_path / "saved")
    assert [r["id"] for r in rows] == ["mp-aaaa", "mp-bbbb"]


def test_new_preset_is_a_few_lines(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"qid": 7, "q": "Why?", "a": "Because."}\n')
    register(Preset("qa-test", "example/qa", "train",
                    convert=lambda r: {"id": r["qid"], "conversations": [{"role": "user", "content": r["q"]},
                                                                         {"role": "assistant", "content": r["a"]}]},
                    detect=lambda r: "qid" in r))
    try:
        assert preset_rows("qa-test", p) == [{"id": "7", "conversations": [
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]}]
        assert read_rows(p)[0]["id"] == "7"  # auto-detected in --input files too
    finally:
        del PRESETS["qa-test"]


def test_unavailable_source_fails_fast_and_says_source_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(SourceUnavailable, match=r"(?s)ultrachat_200k.*--source-path"):
        iter_source_records(get_preset("ultrachat"))
    # Not declared offline, but the hub cannot be reached: still a quick, clear error.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match="--source-path"):
        iter_source_records(get_preset("sharegpt"))
    assert time.time() - t0 < 10
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        iter_source_records(get_preset("sharegpt"), str(tmp_path / "missing_dir"))
