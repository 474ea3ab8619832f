"""Streaming readers: every kind of bad row is skipped and reported with file and line, huge rows are
skipped without being read whole, and JSONL / .gz / JSON lists / Parquet all give the same rows."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pytest

from specforge_core.data.readers import (BadRow, SkipReport, _iter_json, expand_paths, iter_records, iter_rows,
                                         read_rows)

pytestmark = pytest.mark.unit


def conv(rid, user="hi", assistant="hello", **extra):
    return {"id": rid, "conversations": [{"role": "user", "content": user},
                                         {"role": "assistant", "content": assistant}], **extra}


def line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def skips_by_line(report: SkipReport) -> dict[int, str]:
    return {e["line"]: e["code"] for e in report.examples}


def test_every_bad_row_kind_is_skipped_with_file_and_line(tmp_path):
    p = tmp_path / "mixed.jsonl"
    lines = [
        line(conv("ok-1")),                                                              # 1
        b'{"id": "broken", "conversations": [\n',                                        # 2 bad_json
        line({"id": "nofield", "turns": []}),                                            # 3 missing_field
        line({"id": "r", "conversations": [{"role": "wizard", "content": "x"},
                                           {"role": "assistant", "content": "y"}]}),     # 4 unknown_role
        line({"id": "e", "conversations": [{"role": "user", "content": "   "},
                                           {"role": "assistant", "content": "y"}]}),     # 5 empty_turn
        line({"id": "na", "conversations": [{"role": "user", "content": "only a question"}]}),  # 6
        line({"id": "ns", "conversations": [{"role": "user", "content": ["a", "list"]},
                                           {"role": "assistant", "content": "y"}]}),     # 7 non_string
        b"\n",                                                                           # 8 blank: ignored
        b"   \t \n",                                                                     # 9 blank
        line({"id": "ec", "conversations": []}),                                         # 10 empty conversation
        b'{"id": "u8", "text": "caf\xe9 au lait"}\n',                                    # 11 bad_utf8
        line([1, 2, 3]),                                                                 # 12 not an object
        line({"id": "mt", "conversations": [{"role": "user"}, {"role": "assistant", "content": "y"}]}),  # 13
        line(conv("ok-2")),                                                              # 14
    ]
    p.write_bytes(b"".join(lines))
    report = SkipReport()
    rows = read_rows(p, report=report)
    assert [r["id"] for r in rows] == ["ok-1", "ok-2"]
    assert skips_by_line(report) == {2: "bad_json", 3: "missing_field", 4: "unknown_role", 5: "empty_turn",
                                     6: "no_assistant_turn", 7: "non_string_content", 10: "empty_conversation",
                                     11: "bad_utf8", 12: "not_an_object", 13: "missing_field"}
    assert report.total == 10
    assert all(e["file"] == str(p) for e in report.examples)
    assert "byte" in next(e for e in report.examples if e["code"] == "bad_utf8")["message"]
    assert "wizard" in next(e for e in report.examples if e["code"] == "unknown_role")["message"]


def test_skip_report_keeps_first_examples_and_feeds_sink(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"".join(b"nope %d\n" % i for i in range(30)) + line(conv("fine")))
    seen = []
    report = SkipReport(max_examples=5, sink=seen.append)
    assert [r["id"] for r in iter_rows([p], report=report)] == ["fine"]
    assert report.counts == {"bad_json": 30} and report.total == 30
    assert [e["line"] for e in report.examples] == [1, 2, 3, 4, 5]
    assert len(seen) == 30 and seen[-1]["line"] == 30
    assert report.to_dict()["by_reason"] == {"bad_json": 30}
    assert "30 row(s) skipped" in report.summary()


def _write_big_row_file(path, size_mb: int) -> None:
    piece = b"x" * (1 << 20)
    with open(path, "wb") as f:
        f.write(line(conv("before")))
        f.write(b'{"id": "huge", "conversations": [{"role": "user", "content": "')
        for _ in range(size_mb):
            f.write(piece)
        f.write(b'"}, {"role": "assistant", "content": "ok"}]}\n')
        f.write(line(conv("after")))


def test_50mb_row_is_skipped_without_reading_it_whole(tmp_path):
    p = tmp_path / "big.jsonl"
    _write_big_row_file(p, 50)
    assert p.stat().st_size > 50 * (1 << 20)
    report = SkipReport()
    tracemalloc.start()
    try:
        rows = read_rows(p, report=report)  # default max_row_bytes: 16 MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r["id"] for r in rows] == ["before", "after"]
    assert report.counts == {"too_large": 1}
    assert report.examples[0]["line"] == 2 and report.examples[0]["file"] == str(p)
    assert peak < 24 * (1 << 20), f"peak {peak / 2**20:.1f} MiB: the 50 MB row was held in memory"

    # A smaller limit bounds memory further: it is the limit, not the row, that sets the cost.
    tracemalloc.start()
    try:
        rows = read_rows(p, max_row_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r["id"] for r in rows] == ["before", "after"]
    assert peak < 6 * (1 << 20)


def test_row_just_under_the_limit_is_kept(tmp_path):
    p = tmp_path / "edge.jsonl"
    body = line(conv("edge", user="y" * 3000))
    p.write_bytes(body + line(conv("next")))
    assert [r["id"] for r in read_rows(p, max_row_bytes=len(body) - 1)] == ["edge", "next"]  # newline excluded
    report = SkipReport()
    assert [r["id"] for r in read_rows(p, max_row_bytes=len(body) - 2, report=report)] == ["next"]
    assert report.counts == {"too_large": 1}


def test_cat_of_two_files_one_without_trailing_newline(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(line(conv("a1")) + line(conv("a2")).rstrip(b"\n"))  # no final newline
    b.write_bytes(line(conv("b1")) + line(conv("b2")))
    assert [r["id"] for r in read_rows([a, b])] == ["a1", "a2", "b1", "b2"]

    merged = tmp_path / "merged.jsonl"
    merged.write_bytes(a.read_bytes() + b.read_bytes())  # what `cat a.jsonl b.jsonl > merged.jsonl` gives
    records = list(iter_records(merged))
    assert [(n, o["id"]) for n, o in records] == [(1, "a1"), (2, "a2"), (2, "b1"), (3, "b2")]
    assert [r["id"] for r in read_rows(merged)] == ["a1", "a2", "b1", "b2"]


def test_valid_line_followed_by_garbage_keeps_the_value_and_reports_the_rest(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_bytes(json.dumps(conv("first")).encode() + b' {"id": tru\n' + line(conv("second")))
    report = SkipReport()
    assert [r["id"] for r in read_rows(p, report=report)] == ["first", "second"]
    assert skips_by_line(report) == {1: "bad_json"}


def test_gzip_and_bom(tmp_path):
    rows = [conv(f"g{i}", user=f"question {i} ünïcödé") for i in range(50)]
    p = tmp_path / "rows.jsonl.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\xef\xbb\xbf")  # a BOM, as some Windows tools write
        for r in rows:
            f.write(line(r))
        f.write(b"garbage\n")
    report = SkipReport()
    assert read_rows(p, report=report) == rows
    assert skips_by_line(report) == {51: "bad_json"}


def test_lenient_json_values_orjson_refuses(tmp_path):
    p = tmp_path / "odd.jsonl"
    p.write_bytes(b'{"id": 123456789012345678901234567890, "conversations": [{"role": "user", "content": "\\ud800 x"},'
                  b' {"role": "assistant", "content": "y"}]}\n')
    rows = read_rows(p)
    assert rows[0]["id"] == "123456789012345678901234567890"
    assert rows[0]["conversations"][0]["content"] == "\ud800 x"


# ------------------------------------------------------------------------------------------------
# JSON lists
# ------------------------------------------------------------------------------------------------
def test_json_list_incremental_matches_json_load(tmp_path):
    rows = [conv(f"j{i}", user="q" * (i % 37) + " é\\\"{[", assistant=f"a{i}") for i in range(200)]
    p = tmp_path / "list.json"
    p.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    # Tiny chunks put every element across buffer boundaries, including inside strings and escapes.
    for chunk in (7, 64, 1 << 20):
        got = [obj for _, obj in _iter_json(p, max_row_bytes=1 << 20, chunk_size=chunk)]
        assert got == rows, chunk
    # Line numbers are where each element starts in the pretty-printed file.
    text_lines = p.read_text(encoding="utf-8").split("\n")
    for n, obj in _iter_json(p, 1 << 20, chunk_size=13):
        assert text_lines[n - 1].strip() == "{" and obj["id"]
    assert [r["id"] for r in read_rows(p)] == [r["id"] for r in rows]


def test_json_list_with_bad_elements(tmp_path):
    p = tmp_path / "bad_list.json"
    good = json.dumps(conv("g1"))
    p.write_bytes(("[\n" + good + ",\n"
                   '{"id": "broken", "conversations": [{"role": "user" "content": "x"}]},\n'
                   + json.dumps(conv("g2")) + ",\n"
                   '{"id": "unterminated, "conversations": []},\n'
                   + json.dumps(conv("g3")) + ",\n").encode()
                  + b'{"id": "u8", "text": "bad \xff byte"},\n'
                  + (json.dumps(conv("g4")) + "\n]\n").encode())
    for chunk in (5, 1 << 20):
        report = SkipReport()
        records = [(n, o) for n, o in _iter_json(p, 1 << 20, chunk_size=chunk)]
        for n, o in records:
            if isinstance(o, BadRow):
                report.add(p, n, o.code, o.message)
        assert [o["id"] for _, o in records if not isinstance(o, BadRow)] == ["g1", "g2", "g3", "g4"], chunk
        assert skips_by_line(report) == {3: "bad_json", 5: "bad_json", 7: "bad_utf8"}, chunk


def test_json_single_object_concatenated_lists_and_truncation(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(conv("solo"), indent=4), encoding="utf-8")
    assert [r["id"] for r in read_rows(one)] == ["solo"]

    two = tmp_path / "two.json"  # `cat a.json b.json`
    two.write_text(json.dumps([conv("a")]) + json.dumps([conv("b"), conv("c")]), encoding="utf-8")
    assert [r["id"] for r in read_rows(two)] == ["a", "b", "c"]

    trunc = tmp_path / "trunc.json"
    trunc.write_text("[" + json.dumps(conv("t1")) + ",\n" + json.dumps(conv("t2"))[:-10], encoding="utf-8")
    report = SkipReport()
    assert [r["id"] for r in read_rows(trunc, report=report)] == ["t1"]
    assert set(report.counts) == {"bad_json"} and report.examples[0]["line"] == 2

    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    assert read_rows(empty) == []


def test_json_list_too_large_element_is_streamed_over(tmp_path):
    p = tmp_path / "big.json"
    with open(p, "w", encoding="utf-8") as f:
        f.write("[" + json.dumps(conv("small-1")) + ",\n")
        f.write(json.dumps(conv("huge", user="z" * (6 << 20))) + ",\n")
        f.write(json.dumps(conv("small-2")) + "]\n")
    report = SkipReport()
    tracemalloc.start()
    try:
        rows = read_rows(p, max_row_bytes=1 << 20, report=report)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r["id"] for r in rows] == ["small-1", "small-2"]
    assert skips_by_line(report) == {2: "too_large"}
    assert peak < 8 * (1 << 20), f"peak {peak / 2**20:.1f} MiB"  # the 6 MB element is never held whole


# ------------------------------------------------------------------------------------------------
# Parquet, paths, errors
# ------------------------------------------------------------------------------------------------
def test_parquet_record_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"p{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(2500)]
    rows[7]["conversations"] = []  # a bad row in the middle
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=1000)
    report = SkipReport()
    got = read_rows(p, report=report)
    assert len(got) == 2499 and got[0] == {"id": "p0", "conversations": [
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]}
    assert got[-1]["id"] == "p2499"
    assert skips_by_line(report) == {8: "empty_conversation"}

    # Turns with different keys become structs over the union of keys: the None fields must not
    # make a ShareGPT turn look like a role/content one.
    mixed = [{"id": "m1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
             {"id": "m2", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    pm = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(mixed), pm)
    assert [r["conversations"][1]["content"] for r in read_rows(pm)] == ["a", "a"]


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_records(tmp_path / "nope.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type"):
        read_rows(csv)
    notpq = tmp_path / "fake.parquet"
    notpq.write_text("not parquet")
    with pytest.raises(ValueError, match="fake.parquet"):
        read_rows(notpq)


def test_directory_expands_to_supported_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.jsonl").write_bytes(line(conv("b")))
    (tmp_path / "sub" / "a.json").write_text(json.dumps([conv("a")]))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in expand_paths(tmp_path)] == ["b.jsonl", "a.json"]
    assert sorted(r["id"] for r in read_rows(tmp_path)) == ["a", "b"]


def test_with_location_and_convert_none(tmp_path):
    p = tmp_path / "da.jsonl"
    p.write_bytes(line({"system": "Be brief.", "conversations": [{"from": "User", "value": "q"},
                                                                 {"from": "Assistant", "value": "a"}]}))
    (f, n, row), = list(iter_rows(p, with_location=True))
    assert (f, n) == (str(p), 1) and row["conversations"][0] == {"role": "system", "content": "Be brief."}
    # Without conversion the top-level system field is simply not ours and is dropped.
    assert read_rows(p, convert=None)[0]["conversations"][0]["role"] == "user"
