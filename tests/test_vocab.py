"""The draft vocabulary: counting under the mask, top-k selection, d2t / t2d, save / load checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specforge_core.data.vocab import (
    MAPPING_FILE,
    META_FILE,
    VocabMismatchError,
    build_vocab_mapping,
    count_tokens,
    draft_to_target_ids,
    load_vocab_mapping,
    save_vocab_mapping,
    target_to_draft_index,
)

pytestmark = pytest.mark.unit


def test_count_tokens_counts_only_masked_ids():
    ids = [[1, 2, 3, 3, 9], [3, 4, 4, 0]]
    lm = [[0, 1, 1, 1, 0], [1, 0, 1, 1]]
    c = count_tokens(ids, lm, 10)
    assert c.dtype == torch.int64 and c.shape == (10,)
    # masked: 2,3,3 | 3,4,0
    expected = np.zeros(10, dtype=np.int64)
    expected[[0, 2, 3, 4]] = [1, 1, 3, 1]
    assert c.tolist() == expected.tolist()
    assert int(c[9]) == 0 and int(c[1]) == 0  # unmasked ids are not counted


def test_count_tokens_accumulates_in_chunks():
    acc = np.zeros(6, dtype=np.int64)
    count_tokens([[1, 2]], [[1, 1]], 6, out=acc)
    c = count_tokens([[2, 5]], [[1, 1]], 6, out=acc)
    assert c.tolist() == [0, 1, 2, 0, 0, 1]


def test_count_tokens_rejects_out_of_vocab_and_shape_mismatch():
    with pytest.raises(ValueError, match="outside the target vocab"):
        count_tokens([[1, 12]], [[1, 1]], 10)
    with pytest.raises(ValueError, match="loss mask"):
        count_tokens([[1, 2, 3]], [[1, 1]], 10)
    # an out-of-vocab id under a zero mask is still not counted and not an error
    assert count_tokens([[1, 12]], [[1, 0]], 10).tolist()[1] == 1


def test_top_k_with_ties_and_ascending_sort():
    # counts by id:       0  1  2  3  4  5  6  7
    counts = torch.tensor([0, 5, 2, 5, 9, 2, 0, 2], dtype=torch.int64)
    m = build_vocab_mapping(counts, 4)
    # most frequent: 4 (9), then 1 and 3 (5, tie -> both), then one of {2,5,7} (2): smaller id 2 wins.
    kept = [1, 2, 3, 4]
    assert draft_to_target_ids(m.d2t).tolist() == kept
    assert m.d2t.dtype == torch.int64
    assert m.d2t.tolist() == [k - i for i, k in enumerate(kept)] == [1, 1, 1, 1]
    assert m.t2d.dtype == torch.bool and m.t2d.shape == (8,)
    assert m.t2d.tolist() == [False, True, True, True, True, False, False, False]
    assert int(m.t2d.sum()) == m.draft_vocab_size == 4
    assert m.target_vocab_size == 8
    assert m.coverage == pytest.approx((5 + 2 + 5 + 9) / 25)  # total 25 trained tokens


def test_tie_at_the_cut_prefers_smaller_ids():
    counts = torch.tensor([3, 3, 3, 3, 3, 3])
    m = build_vocab_mapping(counts, 3)
    assert m.target_ids.tolist() == [0, 1, 2]
    counts = torch.tensor([1, 3, 1, 3, 1, 3])
    assert build_vocab_mapping(counts, 4).target_ids.tolist() == [0, 1, 3, 5]


def test_padding_with_unseen_ids_lowest_first():
    # seen ids: 7 (4 times), 5 (1 time); draft size 5 -> pad with unseen 0, 1, 2
    counts = torch.zeros(10, dtype=torch.int64)
    counts[7], counts[5] = 4, 1
    m = build_vocab_mapping(counts, 5)
    assert m.target_ids.tolist() == [0, 1, 2, 5, 7]
    assert m.d2t.tolist() == [0, 0, 0, 2, 3]
    assert m.coverage == 1.0
    assert int(m.t2d.sum()) == 5


def test_unsorted_selection_gets_sorted_and_offsets_are_nonnegative():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=300)
    m = build_vocab_mapping(counts, 64)
    ids = m.target_ids
    assert torch.all(ids[1:] > ids[:-1])  # strictly ascending
    assert torch.all(m.d2t >= 0)  # ascending unique ids -> id(i) >= i
    # the kept set is exactly the top-64 by (count desc, id asc)
    expected = sorted(sorted(range(300), key=lambda j: (-counts[j], j))[:64])
    assert ids.tolist() == expected
    assert m.coverage == pytest.approx(counts[expected].sum() / counts.sum())


def test_round_trip_target_draft_target():
    counts = torch.tensor([0, 4, 0, 1, 7, 0, 2, 0, 3, 0], dtype=torch.int64)
    m = build_vocab_mapping(counts, 5)
    index = target_to_draft_index(m.t2d)
    assert index.dtype == torch.int64
    assert index.tolist() == [-1, 0, -1, 1, 2, -1, 3, -1, 4, -1]
    targets = draft_to_target_ids(m.d2t)
    assert index[targets].tolist() == list(range(5))  # target -> draft -> target is the identity
    x = torch.tensor([[4, 8, 9], [1, 1, 2]])
    d = m.to_draft(x)
    assert d.tolist() == [[2, 4, -1], [0, 0, -1]]
    back = m.to_target(d.clamp(min=0))
    assert torch.equal(back[d >= 0], x[d >= 0])


def test_draft_bigger_than_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"draft_vocab_size 11 is larger than the target vocabulary \(10 ids\)"):
        build_vocab_mapping(torch.ones(10, dtype=torch.int64), 11)
    m = build_vocab_mapping(torch.ones(10, dtype=torch.int64), 10)  # equal is fine: identity mapping
    assert m.d2t.tolist() == [0] * 10 and bool(m.t2d.all())


def test_coverage_zero_when_nothing_trained():
    m = build_vocab_mapping(torch.zeros(6, dtype=torch.int64), 3)
    assert m.coverage == 0.0 and m.target_ids.tolist() == [0, 1, 2]


def test_save_load_round_trip_and_mismatch_refused(tmp_path):
    counts = torch.tensor([0, 4, 0, 1, 7, 0, 2, 0, 3, 0], dtype=torch.int64)
    m = build_vocab_mapping(counts, 4)
    save_vocab_mapping(m, tmp_path, key="abc123")
    assert (tmp_path / MAPPING_FILE).exists()
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["key"] == "abc123" and meta["draft_vocab_size"] == 4 and meta["target_vocab_size"] == 10
    assert meta["coverage"] == pytest.approx(m.coverage)

    back = load_vocab_mapping(tmp_path, expect_key="abc123", expect_target_vocab=10, expect_draft_vocab=4)
    assert torch.equal(back.d2t, m.d2t) and torch.equal(back.t2d, m.t2d)
    assert back.d2t.dtype == torch.int64 and back.t2d.dtype == torch.bool

    with pytest.raises(VocabMismatchError) as ei:
        load_vocab_mapping(tmp_path, expect_key="other")
    msg = str(ei.value)
    assert "vocab.json" in msg and "'abc123'" in msg and "'other'" in msg
    with pytest.raises(VocabMismatchError, match=r"target vocab size is 10, expected 128256"):
        load_vocab_mapping(tmp_path, expect_target_vocab=128256)
    with pytest.raises(VocabMismatchError, match=r"draft vocab size is 4, expected 32"):
        load_vocab_mapping(tmp_path, expect_draft_vocab=32)
    assert issubclass(VocabMismatchError, ValueError)


def test_load_detects_corrupt_mapping(tmp_path):
    from safetensors.torch import save_file

    m = build_vocab_mapping(torch.tensor([1, 2, 3, 4, 5, 6]), 3)
    save_vocab_mapping(m, tmp_path, key="k")
    # d2t that no longer agrees with t2d
    save_file({"d2t": torch.tensor([0, 0, 1], dtype=torch.int64), "t2d": m.t2d}, str(tmp_path / MAPPING_FILE))
    with pytest.raises(VocabMismatchError, match="disagree"):
        load_vocab_mapping(tmp_path, expect_key="k")
    with pytest.raises(FileNotFoundError):
        load_vocab_mapping(tmp_path / "nowhere")
