"""Shared fixtures: real tokenizers (SmolLM2's ChatML one, Meta's Llama-3) and tiny random Llamas."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    from specforge_core.targets import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from specforge_core.targets import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="session")
def default_model_dir():
    from specforge_core.targets import default_model_dir

    return default_model_dir()


def tiny_llama_config(vocab_size: int = 512, hidden_size: int = 64, num_hidden_layers: int = 4, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, **kw)


@pytest.fixture
def tiny_llama():
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()
