"""Job configs: the shared data/target fields (`DataFields`) and the one way from them to a cache."""

from __future__ import annotations

import pytest

from specforge_core.data.config import BuildCacheConfig, DataFields
from specforge_core.offline.config import DumpConfig, EstimateDumpConfig
from specforge_core.training.config import TrainConfig

pytestmark = pytest.mark.unit

SHARED = dict(target_model="t", train_data=["a.jsonl"], eval_data=["b.jsonl"], chat_template="chatml",
              max_length=64, train_only_last_turn=True, cache_dir="c", num_proc=1, draft_vocab_size=100)


def test_train_and_dump_find_the_same_cache():
    # Same key <=> same BuildCacheConfig: an offline run must read the samples the online run trained on.
    train = TrainConfig(**SHARED).build_cache_config()
    assert train == DumpConfig(**SHARED).build_cache_config() == EstimateDumpConfig(**SHARED).build_cache_config()
    assert train == BuildCacheConfig(data=["a.jsonl"], eval_data=["b.jsonl"], tokenizer="t", chat_template="chatml",
                                     max_length=64, train_only_last_turn=True, cache_dir="c", num_proc=1,
                                     draft_vocab_size=100)
    assert TrainConfig(**SHARED, tokenizer="tok").build_cache_config().tokenizer == "tok"


def test_shared_fields_have_one_definition():
    # A subclass that re-declares a shared field would quietly fork its flag, default or help.
    for cls in (TrainConfig, DumpConfig):
        for name, field in DataFields.model_fields.items():
            if (cls, name) == (DumpConfig, "draft_vocab_size"):
                continue  # its own help line; same type and default
            assert repr(cls.model_fields[name]) == repr(field), (cls.__name__, name)
    assert DumpConfig.model_fields["draft_vocab_size"].default == DataFields.model_fields["draft_vocab_size"].default
