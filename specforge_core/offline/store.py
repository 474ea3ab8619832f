"""The offline hidden-state store: what a target forward pass gives a draft, kept on disk for training.

Layout of a store directory:
  run.json          self-description: kind `hidden-states`, the dump config, the tokenised cache (path +
                    key), the target's identity (resolved path + hash of its config and weight files),
                    capture layer ids, hidden size, vocab size, pad id, storage format.
  manifest.jsonl    the commit journal: one JSON line per finished shard (split, sample indices,
                    lengths, teacher rows, bytes, crc32), appended and fsynced *after* the shard file
                    was renamed into place. A torn last line is ignored; a shard file that no line names
                    is an orphan from a crash and is deleted when a writer opens the store.
  manifest.json     written (atomically) when a dump finishes: totals and `complete` per split.
  manifest.r<R>.jsonl  only while a parallel dump (torchrun) runs: rank R's own journal of its own shards
                    (`shards/<split>-r<R>-<n>.safetensors`); rank 0 merges them into manifest.jsonl when
                    the ranks finish and before a resumed dump starts (`merge_rank_journals`), so readers
                    only ever read the one manifest.
  shards/<split>-<n>.safetensors   one flat, memory-mappable file per shard, written to a temp name,
                    fsynced and renamed: a reader never sees half a shard.

What a shard holds (rows of all its samples, concatenated):
  aux        [tokens, 3H]   the captured layer outputs, for every token (bf16 by default); in a store of
                            `states: last` (run.json; a Medusa dump, `--draft-type medusa`) [tokens, H]:
                            the target's final normed last hidden state, what Medusa heads read, and no
                            captured layers (`layer_ids` [])
  aux_scale  [tokens, 3]    bf16 per-(token, layer) scales, only for the fp8 (e4m3) format ([tokens, 1]
                            for `states: last`)
  last       [rows, H]      the target's final normed hidden state, only at the positions that teach
                            something: s such that token s+1 is trained (loss_mask[s+1] == 1). The TTT
                            reads the teacher at t+1+k to predict token t+2+k and gates it by
                            loss_mask[t+2+k], so every other position is multiplied by zero; storing
                            only these rows is lossless. Logits are recomputed from `last` with the
                            target's lm_head (V/H times smaller than storing logits: 85x for Llama-3-8B).
  topk_val   [rows, k] fp16 instead of `last` with teacher "topk" (run.json `teacher`, `topk`): the
  topk_idx   [rows, k] int32 target's k largest logits at those positions, shifted so each row's max is
                            0 (softmax and argmax, all the TTT takes, ignore a shift), and their token ids.
                            Training then needs no lm_head; `topk_logits` rebuilds [.., V] logits with a
                            low finite floor outside the k (never -inf: see there). Lossy: the teacher
                            becomes the target's distribution renormalised over its top k.
  last_pos   [rows] int32   the position of each teacher row within its sample
  tok_off, row_off [n+1] int64, indices [n] int64: where each sample's rows start.

Bytes per token (H = target hidden size, f = fraction of tokens that are followed by a trained token,
k = top-k; a teacher row costs 2H (hidden, bf16/fp16/fp8 formats), 4H (float32) or 6k (top-k), + 4):
  bfloat16 / float16        6H + f*(2H + 4)     H=576: 4034   H=4096 (8B): 28674
  float32                   12H + f*(4H + 4)           8066                57346
  fp8_e4m3                  3H + 6 + f*(2H + 4)        2312                16392
  bfloat16 + top-64         6H + f*(6k + 4)            3650                24770
  fp8_e4m3 + top-64         3H + 6 + f*(6k + 4)        1928                12488
  (the numbers are at f = 0.5, typical of chat data; `bytes_per_token` / `estimate_bytes` are exact.)
A `states: last` store (Medusa) keeps one H-wide state per token instead of three: 2H (bf16), H + 2
(fp8), 4H (fp32), plus the same teacher rows (a hidden teacher duplicates those rows of the states:
kept, so the teacher stays bf16 when the states are fp8 and both families share one reader).
Measured for SmolLM2 (H=576, f=0.51), EAGLE3 / Medusa: fp8 + top-64 1933 / 777, bf16 + top-64 3654 / 1350,
bf16 + hidden 4045 / 1741.
SpecForge stores 8H + 16 per token (three aux states + last hidden state in bf16, plus ids and mask):
4624 B for H=576, 32 KiB per token for an 8B target. fp8 is half of that, fp8 + top-64 about 38%.
What each lossy option costs in draft quality is measured by bench/offline_quality.py; the dump's
default is the smallest option that costs < 2% of simulated acceptance length against bf16 storage
(the measured figures are in the comment above `DumpConfig.format`).

Checksums: a crc32 of each shard file, checked the first time a reader opens that shard (reading the
file once, which training does anyway); a mismatch or a wrong size names the shard and says to run
the dump again with `--repair`, which drops the bad shard and redoes its samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from ..events import read_events

STORE_KIND = "hidden-states"
STORE_FORMAT = 2           # 2: optional top-k teacher; format-1 stores (last hidden state) still read
STATES = ("aux", "last")   # run.json `states`: captured aux layers (EAGLE3) or the last hidden state (Medusa)
JOURNAL = "manifest.jsonl"
SUMMARY = "manifest.json"
SHARDS = "shards"
FORMATS = ("bfloat16", "float16", "float32", "fp8_e4m3")
TEACHERS = ("hidden", "topk")
DEFAULT_TOPK = 64
FP8_MAX = 448.0            # largest finite float8 e4m3fn value
PER_SAMPLE_BYTES = 8 * 3   # tok_off + row_off + indices entries
_HASH_EDGE = 1 << 20       # bytes hashed at each end of a weight file for the target's identity


class StoreError(ValueError):
    """A store that cannot be used as asked; the message names the directory or shard."""


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------
def _elem(fmt: str) -> tuple[int, int, int]:
    """(aux bytes per value, aux scale bytes per token-layer, last bytes per value)."""
    if fmt not in FORMATS:
        raise StoreError(f"unknown store format {fmt!r}; choose one of {FORMATS}")
    return {"bfloat16": (2, 0, 2), "float16": (2, 0, 2), "float32": (4, 0, 4), "fp8_e4m3": (1, 2, 2)}[fmt]


def teacher_row_bytes(hidden_size: int, fmt: str = "bfloat16", teacher: str = "hidden",
                      topk: int = DEFAULT_TOPK) -> int:
    """Bytes of one teacher row: the last hidden state (H values) or k fp16 logits + k int32 ids; +4 for
    its int32 position."""
    if teacher == "topk":
        return int(topk) * (2 + 4) + 4
    if teacher != "hidden":
        raise StoreError(f"unknown teacher {teacher!r}; choose one of {TEACHERS}")
    return int(hidden_size) * _elem(fmt)[2] + 4


def bytes_per_token(hidden_size: int, fmt: str = "bfloat16", teacher_fraction: float = 1.0,
                    num_aux_layers: int = 3, teacher: str = "hidden", topk: int = DEFAULT_TOPK) -> float:
    """Store bytes per token (see the module docstring); teacher_fraction = share of positions that
    keep a teacher row (1.0 is the worst case)."""
    a, s, _ = _elem(fmt)
    H = int(hidden_size)
    aux = num_aux_layers * H * a + num_aux_layers * s
    return aux + teacher_fraction * teacher_row_bytes(H, fmt, teacher, topk)


def specforge_bytes_per_token(hidden_size: int) -> int:
    """What SpecForge's per-sample torch.save files cost per token: 3H + H in bf16, plus ids and mask."""
    return 8 * int(hidden_size) + 16


def teacher_positions(loss_mask) -> Tensor:
    """Positions s whose teacher row is ever used by the TTT: token s+1 is trained."""
    lm = torch.as_tensor(loss_mask).bool().flatten()
    if lm.numel() < 2:
        return torch.zeros(0, dtype=torch.int32)
    return torch.nonzero(lm[1:]).flatten().to(torch.int32)


def estimate_bytes(lengths: Iterable[int], teacher_rows: Iterable[int], hidden_size: int, fmt: str,
                   num_aux_layers: int = 3, teacher: str = "hidden", topk: int = DEFAULT_TOPK) -> int:
    """Exact payload bytes for samples of these lengths / teacher-row counts (shard headers excluded)."""
    a, s, _ = _elem(fmt)
    H = int(hidden_size)
    lengths, teacher_rows = list(lengths), list(teacher_rows)
    toks = sum(int(x) for x in lengths)
    rows = sum(int(x) for x in teacher_rows)
    n = len(lengths)
    return (toks * (num_aux_layers * H * a + num_aux_layers * s) + rows * teacher_row_bytes(H, fmt, teacher, topk)
            + n * PER_SAMPLE_BYTES)


def topk_rows(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k teacher rows of logits [rows, V]: (values - row max in fp16, int32 ids), best first.

    Shifting by the row max loses nothing (the TTT only takes softmaxes and argmaxes) and puts the
    values that matter most near 0, where fp16 is most precise.
    """
    k = min(int(k), logits.shape[-1])
    v, i = torch.topk(logits.float(), k, dim=-1)
    v = (v - v[..., :1]).clamp_min(-60000.0)  # stays finite in fp16
    return v.to(torch.float16), i.to(torch.int32)


def topk_logits(values: Tensor, indices: Tensor, vocab_size: int, dtype: torch.dtype = torch.float32,
                out: Tensor | None = None) -> Tensor:
    """Logits [..., V] from top-k rows: the stored values at their ids, a very low *finite* value elsewhere.

    Not -inf: the TTT takes softmax(logits[..., t2d]) over the draft vocab, and a position whose k ids all
    lie outside the draft vocab would give 0/0 = NaN there, which a zero mask weight does not cancel
    (NaN * 0 = NaN). With a finite floor that position's teacher is uniform, and since its argmax (the
    top-1 id) is outside the draft vocab the TTT does not count it. Rows whose values are all the floor
    (positions the store keeps no teacher for) come out uniform too, as zero hidden states do.
    """
    floor = torch.finfo(dtype).min
    shape = tuple(values.shape[:-1]) + (int(vocab_size),)
    if out is None:
        out = torch.full(shape, floor, dtype=dtype, device=values.device)
    else:
        out.fill_(floor)
    out.scatter_(-1, indices.long(), values.to(dtype))
    return out


@dataclass(frozen=True)
class TopKLogits:
    """A batch's teacher as a top-k store keeps it, standing in for the dense [B, T, V] logits that
    `topk_logits` would rebuild: values [B, T, k] (descending, in `dtype`), ids [B, T, k] int64, and the
    floor everywhere else. The TTT reads it in the draft vocab directly (`models.ttt.draft_teacher`), so
    training never builds a [B, T, V] tensor: with a 49k target vocab that rebuild was a quarter of a
    CPU training step."""
    values: Tensor
    ids: Tensor
    vocab_size: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.values.shape[:-1], int(self.vocab_size))

    def dense(self) -> Tensor:
        return topk_logits(self.values, self.ids, self.vocab_size, self.dtype)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ------------------------------------------------------------------------------------------------
# Target identity and the light target (no decoder weights) used by offline training
# ------------------------------------------------------------------------------------------------
def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def target_identity(name: str) -> dict:
    """Resolved location, config facts and a hash of config.json plus each weight file's size and
    first/last MiB (cheap on a 16 GB target, yet two differently initialised targets differ)."""
    from ..targets import resolve_model

    resolved = Path(resolve_model(name))
    h = hashlib.sha256()
    conf = {}
    cp = resolved / "config.json"
    if cp.is_file():
        h.update(_sha256_file(cp).encode())
        conf = json.loads(cp.read_text(encoding="utf-8"))
    for f in sorted(list(resolved.glob("*.safetensors")) + list(resolved.glob("*.bin"))):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_HASH_EDGE))
            if size > _HASH_EDGE:
                fh.seek(max(_HASH_EDGE, size - _HASH_EDGE))
                h.update(fh.read(_HASH_EDGE))
    text = conf.get("text_config") or conf
    return {"name": name, "resolved": str(resolved), "sha256": h.hexdigest(),
            "vocab_size": text.get("vocab_size"), "hidden_size": text.get("hidden_size"),
            "num_hidden_layers": text.get("num_hidden_layers")}


def _weight_lookup(resolved: Path) -> dict[str, Path]:
    idx = resolved / "model.safetensors.index.json"
    if idx.is_file():
        wm = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
        return {k: resolved / v for k, v in wm.items()}
    out = {}
    from safetensors import safe_open

    for f in sorted(resolved.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = f
    return out


def _read_tensor(lookup: dict[str, Path], suffixes: tuple[str, ...]) -> Tensor | None:
    from safetensors import safe_open

    for key, f in lookup.items():
        if any(key == s or key.endswith("." + s) for s in suffixes):
            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(key)
    return None


class TargetHead:
    """What offline training needs of the target: config, input embedding, lm_head; no decoder layers.

    Read straight from the safetensors files (the 70B target's 140 GB are never loaded); a target
    stored only as .bin falls back to loading the whole model once on the CPU. With `lm_head=False`
    (a top-k store, whose teacher needs no recomputation) the lm_head is not read at all.
    """

    def __init__(self, name: str, dtype: torch.dtype = torch.float32, device="cpu",
                 layer_ids: list[int] | None = None, pad_token_id: int | None = None, lm_head: bool = True,
                 aux: bool = True):
        from transformers import AutoConfig

        from ..models.target import default_layer_ids, validate_layer_ids
        from ..targets import resolve_model

        resolved = Path(resolve_model(name))
        conf = AutoConfig.from_pretrained(str(resolved))
        get = getattr(conf, "get_text_config", None)
        self.config = get() if callable(get) else conf
        self.num_layers = int(self.config.num_hidden_layers)
        if not aux:  # a Medusa run: no captured layers
            self.layer_ids: list[int] = []
        else:
            self.layer_ids = validate_layer_ids(layer_ids, self.num_layers) if layer_ids is not None \
                else default_layer_ids(self.num_layers)
        self.hidden_size = int(self.config.hidden_size)
        lookup = _weight_lookup(resolved)
        emb = _read_tensor(lookup, ("embed_tokens.weight",)) if lookup else None
        head = _read_tensor(lookup, ("lm_head.weight",)) if lookup and lm_head else None
        if emb is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(resolved), dtype=torch.float32)
            emb = model.get_input_embeddings().weight.detach().clone()
            head = model.get_output_embeddings().weight.detach().clone()
            del model
        if not lm_head:
            head = None
        elif head is None:
            if not getattr(conf, "tie_word_embeddings", False) and not getattr(self.config, "tie_word_embeddings",
                                                                                   False):
                raise StoreError(f"{resolved}: no lm_head.weight in the safetensors files and the config does not "
                                 "tie it to the embedding")
            head = emb
        self.device = torch.device(device)
        self._lookup = lookup
        self._embedding = emb.to(dtype)
        self.lm_head = head.to(dtype=dtype, device=self.device) if head is not None else None
        self.vocab_size = int((self.lm_head if self.lm_head is not None else emb).shape[0])
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0

    def embedding_weight(self) -> Tensor:
        return self._embedding

    def lm_head_weight(self) -> Tensor | None:
        return self.lm_head

    def final_norm_weight(self) -> Tensor | None:
        """The target's final norm weight, read from its files (None when they do not hold one)."""
        if not self._lookup:
            return None
        return _read_tensor({k: f for k, f in self._lookup.items() if k in ("model.norm.weight", "norm.weight")},
                            ("norm.weight",))

    def logits_from_hidden(self, last_hidden: Tensor) -> Tensor:
        if self.lm_head is None:
            raise StoreError("this TargetHead was loaded without its lm_head (top-k store)")
        logits = torch.nn.functional.linear(last_hidden.to(self.lm_head.dtype), self.lm_head)
        if self.softcap:  # Gemma-2 style soft-capping is part of the target's distribution
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def _fsync_dir(p: Path) -> None:
    try:
        fd = os.open(str(p), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_crc32(p: Path) -> int:
    crc = 0
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(b, crc)
    return crc & 0xFFFFFFFF


def read_journal(directory: Path, name: str = JOURNAL) -> list[dict]:
    """Committed shard records; a torn last line (crash mid-append) is ignored."""
    return [r for r in read_events(Path(directory) / name) if isinstance(r, dict) and "shard" in r]


def merge_rank_journals(directory: str | Path) -> int:
    """Fold the per-rank journals of a parallel dump (`manifest.r<R>.jsonl`) into `manifest.jsonl`, then delete
    them; the number of shard records added. Crash-safe: the merged journal is written whole and renamed in
    before the rank journals go, and records already merged (same shard name) are not added twice. Call it
    while no rank is writing (before a dump starts, after all ranks finished)."""
    d = Path(directory)
    ranks = sorted(d.glob("manifest.r*.jsonl"))
    if not ranks:
        return 0
    records = read_journal(d)
    names = {r["shard"] for r in records}
    new = []
    for p in ranks:
        for r in read_journal(d, p.name):
            if r["shard"] not in names and (d / SHARDS / r["shard"]).exists():
                names.add(r["shard"])
                new.append(r)
    tmp = d / (JOURNAL + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records + new:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / JOURNAL)
    _fsync_dir(d)
    for p in ranks:
        p.unlink(missing_ok=True)
    _fsync_dir(d)
    return len(new)


def _quantize_fp8(aux: Tensor, num_layers: int) -> tuple[Tensor, Tensor]:
    N, W = aux.shape
    x = aux.float().view(N, num_layers, W // num_layers)
    # bf16 scales (2 bytes) keep fp8 storage at half of SpecForge's; quantising with the rounded
    # scale makes dequantisation use exactly the scale the values were divided by.
    scale = (x.abs().amax(-1) / FP8_MAX).clamp_min(1e-30).to(torch.bfloat16)   # [N, layers]
    q = (x / scale.float()[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(N, W)
    return q, scale.contiguous()


def _dequantize(aux: Tensor, scale: Tensor | None, num_layers: int, dtype: torch.dtype) -> Tensor:
    if scale is None:
        return aux.to(dtype)
    N, W = aux.shape
    return (aux.float().view(N, num_layers, W // num_layers) * scale.float()[..., None]).view(N, W).to(dtype)


@dataclass
class _Pending:
    indices: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    aux: list[Tensor] = field(default_factory=list)
    last: list[Tensor] = field(default_factory=list)
    tk_idx: list[Tensor] = field(default_factory=list)
    pos: list[Tensor] = field(default_factory=list)
    nbytes: int = 0


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------
class StoreWriter:
    """Appends samples to a store, one atomically committed shard at a time (`put`, `flush`).

    Opening a store that a crash left behind removes temp files and orphan shards (renamed but not
    committed); with `verify` it also checks every committed shard's size and crc32, and with `repair`
    it drops the bad ones (their samples are then missing, so a resumed dump redoes them).

    `rank_tag` (a parallel dump: "r0", "r1", ...): the writer commits its shards (`<split>-<tag>-<n>`) to its
    own journal `manifest.<tag>.jsonl` and recovers only its own files, so ranks never touch each other's;
    what `manifest.jsonl` already holds counts as done. `merge_rank_journals` folds the journals together.
    """

    def __init__(self, directory: str | Path, fmt: str, num_aux_layers: int = 3,
                 shard_bytes: int = 256 << 20, verify: bool = False, repair: bool = False, events=None,
                 teacher: str = "hidden", topk: int = DEFAULT_TOPK, rank_tag: str | None = None):
        _elem(fmt)
        if teacher not in TEACHERS:
            raise StoreError(f"unknown teacher {teacher!r}; choose one of {TEACHERS}")
        self.dir = Path(directory)
        self.fmt = fmt
        self.teacher = teacher
        self.topk = int(topk)
        self.num_aux_layers = num_aux_layers
        self.shard_bytes = int(shard_bytes)
        self.events = events
        self.rank_tag = rank_tag
        self.journal = f"manifest.{rank_tag}.jsonl" if rank_tag else JOURNAL
        (self.dir / SHARDS).mkdir(parents=True, exist_ok=True)
        self.records = read_journal(self.dir, self.journal)
        self._recover(verify, repair)
        known = (read_journal(self.dir) if rank_tag else []) + self.records
        self._done = {(r["split"], int(i)) for r in known for i in r["indices"]}
        self._skipped = {(r["split"], int(i)) for r in known for i in r.get("skipped", [])}
        mine = [r for r in known if self._mine(r["shard"])] if rank_tag else known
        self._seq = 1 + max((int(r["shard"].rsplit("-", 1)[1].split(".")[0]) for r in mine), default=-1)
        self._pending: dict[str, _Pending] = {}
        self._pending_skips: dict[str, list[int]] = {}

    def _note(self, msg: str, **fields) -> None:
        if self.events is not None:
            self.events.warning(msg, **fields)

    def _mine(self, filename: str) -> bool:
        return self.rank_tag is None or f"-{self.rank_tag}-" in filename

    def _recover(self, verify: bool, repair: bool) -> None:
        jp = self.dir / self.journal
        if jp.exists():
            raw = jp.read_bytes()
            if raw and (not raw.endswith(b"\n") or raw.count(b"\n") != len(self.records)):
                # A torn append (crash mid-line): drop it now, or the next record would join it.
                self._rewrite_journal()
                self._note(f"{jp}: dropped a torn journal line left by an interrupted dump")
        named = {r["shard"] for r in self.records}
        for f in (self.dir / SHARDS).iterdir():
            if f.name not in named and self._mine(f.name):
                # A temp file or a shard renamed in place just before a crash, never committed.
                f.unlink(missing_ok=True)
                if not f.name.startswith(".tmp"):
                    self._note(f"removed uncommitted shard {f} (left by an interrupted dump)", shard=f.name)
        bad = []
        for r in self.records:
            p = self.dir / SHARDS / r["shard"]
            problem = None
            if not p.exists():
                problem = "missing"
            elif p.stat().st_size != r["bytes"]:
                problem = f"size {p.stat().st_size} != {r['bytes']} (truncated or overwritten)"
            elif verify and file_crc32(p) != r["crc32"]:
                problem = "crc32 mismatch (corrupted)"
            if problem:
                bad.append((r, problem))
        if bad and not repair:
            r, problem = bad[0]
            raise StoreError(f"{self.dir / SHARDS / r['shard']}: shard {problem}; run the dump again with "
                             f"--repair to drop and redo it ({len(bad)} bad shard(s))")
        if bad:
            drop = {r["shard"] for r, _ in bad}
            for r, problem in bad:
                (self.dir / SHARDS / r["shard"]).unlink(missing_ok=True)
                self._note(f"repair: dropped shard {r['shard']} ({problem}); its {len(r['indices'])} samples "
                           "will be redone", shard=r["shard"])
            self.records = [r for r in self.records if r["shard"] not in drop]
            self._rewrite_journal()

    def _rewrite_journal(self) -> None:
        tmp = self.dir / (self.journal + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / self.journal)
        _fsync_dir(self.dir)

    # -- state ---------------------------------------------------------------------------------
    def exists(self, split: str, index: int) -> bool:
        """Committed (stored, or skipped for non-finite values)."""
        return (split, int(index)) in self._done or (split, int(index)) in self._skipped

    def done_count(self, split: str) -> int:
        return sum(1 for s, _ in self._done if s == split)

    def skipped(self, split: str) -> list[int]:
        return sorted(i for s, i in self._skipped if s == split)

    # -- writing -------------------------------------------------------------------------------
    def put(self, split: str, index: int, aux: Tensor, last_pos: Tensor, last: Tensor | None = None, *,
            topk: tuple[Tensor, Tensor] | None = None) -> None:
        """Queue one sample: aux [T, 3H] (all tokens) and, at positions last_pos [rows], the teacher:
        `last` [rows, H] (teacher "hidden") or `topk` = (values [rows, k], ids [rows, k]) from
        `topk_rows` (teacher "topk")."""
        p = self._pending.setdefault(split, _Pending())
        pos = torch.as_tensor(last_pos, dtype=torch.int32).cpu()
        if self.teacher == "topk":
            if topk is None:
                raise StoreError(f"{self.dir}: a top-k store needs topk=(values, ids) for {split} sample {index}")
            vals, ids = (t.detach().to("cpu") for t in topk)
            if tuple(vals.shape) != (pos.numel(), self.topk) or vals.shape != ids.shape:
                raise StoreError(f"{self.dir}: {split} sample {index}: top-k rows of shape {tuple(vals.shape)} / "
                                 f"{tuple(ids.shape)}, expected {(pos.numel(), self.topk)}")
            last, rows = vals.to(torch.float16), vals.shape[0]
            p.tk_idx.append(ids.to(torch.int32))
        else:
            if last is None:
                raise StoreError(f"{self.dir}: a hidden-teacher store needs `last` for {split} sample {index}")
            last = last.detach().to("cpu")
            rows = last.shape[0]
        aux = aux.detach().to("cpu")
        p.indices.append(int(index))
        p.lengths.append(int(aux.shape[0]))
        p.rows.append(int(rows))
        p.aux.append(aux)
        p.last.append(last)
        p.pos.append(pos)
        a, s, _ = _elem(self.fmt)
        p.nbytes += (aux.numel() * a + aux.shape[0] * self.num_aux_layers * s
                     + rows * teacher_row_bytes(aux.shape[1] // self.num_aux_layers, self.fmt, self.teacher,
                                                self.topk))
        if p.nbytes >= self.shard_bytes:
            self.flush(split)

    def skip(self, split: str, index: int, reason: str) -> None:
        """Record a sample that cannot be stored (non-finite values); committed with the next shard."""
        self._pending_skips.setdefault(split, []).append(int(index))
        self._note(f"{split} sample {index}: {reason}; skipped", split=split, index=int(index))

    def flush(self, split: str | None = None) -> None:
        for s in ([split] if split else sorted(set(self._pending) | set(self._pending_skips))):
            self._write_shard(s)

    def _write_shard(self, split: str) -> None:
        from safetensors.torch import save

        p = self._pending.pop(split, None)
        skips = self._pending_skips.pop(split, [])
        if (p is None or not p.indices) and not skips:
            return
        p = p or _Pending()
        H3 = p.aux[0].shape[1] if p.aux else 0
        aux = torch.cat(p.aux) if p.aux else torch.zeros(0, H3)
        last = None
        if self.teacher == "hidden":
            last = torch.cat(p.last) if p.last and sum(p.rows) else (
                torch.zeros(0, p.last[0].shape[1]) if p.last else torch.zeros(0, 0))
        tensors = {
            "last_pos": torch.cat(p.pos) if p.pos else torch.zeros(0, dtype=torch.int32),
            "tok_off": torch.tensor([0] + list(_cumsum(p.lengths)), dtype=torch.int64),
            "row_off": torch.tensor([0] + list(_cumsum(p.rows)), dtype=torch.int64),
            "indices": torch.tensor(p.indices, dtype=torch.int64),
        }
        if self.fmt == "fp8_e4m3":
            q, scale = _quantize_fp8(aux, self.num_aux_layers)
            tensors["aux"], tensors["aux_scale"] = q.contiguous(), scale
        else:
            tensors["aux"] = aux.to(getattr(torch, self.fmt)).contiguous()
        if self.teacher == "topk":
            k = self.topk
            tensors["topk_val"] = (torch.cat(p.last) if p.last else torch.zeros(0, k)).to(torch.float16).contiguous()
            tensors["topk_idx"] = (torch.cat(p.tk_idx) if p.tk_idx else torch.zeros(0, k)).to(torch.int32).contiguous()
        else:
            dt = torch.bfloat16 if self.fmt == "fp8_e4m3" else getattr(torch, self.fmt)
            tensors["last"] = last.to(dt).contiguous()
        name = f"{split}-{self.rank_tag + '-' if self.rank_tag else ''}{self._seq:06d}.safetensors"
        self._seq += 1
        final = self.dir / SHARDS / name
        tmp = self.dir / SHARDS / f".tmp-{name}"
        blob = save(tensors, metadata={"format": self.fmt, "teacher": self.teacher, "split": split,
                                       "store_format": str(STORE_FORMAT)})
        crc = zlib.crc32(blob) & 0xFFFFFFFF  # from memory: no second read of the file
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        del blob
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        rec = {"shard": name, "split": split, "indices": p.indices, "lengths": p.lengths, "rows": p.rows,
               "skipped": skips, "bytes": final.stat().st_size, "crc32": crc}
        # The commit point: until this line is durable the shard is an orphan a resume deletes.
        with open(self.dir / self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)
        self._done.update((split, i) for i in p.indices)
        self._skipped.update((split, i) for i in skips)

    def finish(self, complete: dict[str, bool], extra: dict | None = None) -> dict:
        """Flush and write manifest.json (totals, completeness) atomically."""
        self.flush()
        summary = summarize(self.records, self.fmt, self.teacher, self.topk)
        summary.update(complete=complete, **(extra or {}))
        tmp = self.dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, self.dir / SUMMARY)
        return summary


def _cumsum(xs: list[int]):
    t = 0
    for x in xs:
        t += x
        yield t


def summarize(records: list[dict], fmt: str, teacher: str = "hidden", topk: int | None = None) -> dict:
    out: dict = {"store_format": STORE_FORMAT, "format": fmt, "teacher": teacher, "splits": {}}
    if teacher == "topk":
        out["topk"] = topk
    for r in records:
        s = out["splits"].setdefault(r["split"], {"samples": 0, "tokens": 0, "teacher_rows": 0, "bytes": 0,
                                                  "shards": 0, "skipped": 0})
        s["samples"] += len(r["indices"])
        s["tokens"] += sum(r["lengths"])
        s["teacher_rows"] += sum(r["rows"])
        s["bytes"] += r["bytes"]
        s["shards"] += 1
        s["skipped"] += len(r.get("skipped", []))
    for s in out["splits"].values():
        s["bytes_per_token"] = s["bytes"] / max(s["tokens"], 1)
    return out


# ------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------
class HiddenStateStore:
    """Read side of a store: `exists`, `get`, `manifest`, and `batch` (padded tensors for a Batch)."""

    def __init__(self, directory: str | Path, verify: bool = True):
        from ..config import ConfigError, read_run_json

        self.dir = Path(directory)
        try:
            self.run = read_run_json(self.dir, expect_kind=STORE_KIND)
        except ConfigError as e:
            raise StoreError(str(e)) from None
        if self.run.get("store_format", 0) > STORE_FORMAT:
            raise StoreError(f"{self.dir}: store format {self.run.get('store_format')} is newer than this code "
                             f"understands ({STORE_FORMAT})")
        self.fmt = self.run["format"]
        self.teacher = self.run.get("teacher", "hidden")
        if self.teacher not in TEACHERS:
            raise StoreError(f"{self.dir}: unknown teacher {self.teacher!r} in run.json")
        self.topk = int(self.run.get("topk") or DEFAULT_TOPK)
        self.hidden_size = int(self.run["hidden_size"])
        self.layer_ids = list(self.run["layer_ids"])
        self.states = store_states(self.run)
        # A last-state store keeps one H-wide state per token where an aux store keeps len(layer_ids).
        self.num_aux_layers = 1 if self.states == "last" else len(self.layer_ids)
        self.verify = verify
        self.records = read_journal(self.dir)
        self._where: dict[tuple[str, int], tuple[dict, int]] = {}
        for r in self.records:
            for j, i in enumerate(r["indices"]):
                self._where[(r["split"], int(i))] = (r, j)
        self._open: dict[str, tuple] = {}

    def manifest(self) -> dict:
        s = summarize(self.records, self.fmt, self.teacher, self.topk)
        p = self.dir / SUMMARY
        if p.exists():
            s["complete"] = json.loads(p.read_text(encoding="utf-8")).get("complete", {})
        return s

    def exists(self, split: str, index: int) -> bool:
        return (split, int(index)) in self._where

    def indices(self, split: str) -> list[int]:
        return sorted(i for s, i in self._where if s == split)

    def _shard(self, rec: dict):
        name = rec["shard"]
        got = self._open.get(name)
        if got is not None:
            return got
        from safetensors import safe_open

        p = self.dir / SHARDS / name
        if not p.exists():
            raise StoreError(f"{p}: shard missing; run dump-hidden-states again with --repair to redo it")
        if p.stat().st_size != rec["bytes"]:
            raise StoreError(f"{p}: shard is {p.stat().st_size} bytes, the manifest says {rec['bytes']} (truncated "
                             "or overwritten); run dump-hidden-states again with --repair")
        if self.verify and file_crc32(p) != rec["crc32"]:
            raise StoreError(f"{p}: crc32 mismatch (corrupted shard); run dump-hidden-states again with --repair")
        try:
            sf = safe_open(str(p), framework="pt")
            tok_off = sf.get_tensor("tok_off")
            row_off = sf.get_tensor("row_off")
            has_scale = "aux_scale" in sf.keys()
        except Exception as e:  # noqa: BLE001 - any parse failure means the shard is unusable
            raise StoreError(f"{p}: cannot read shard ({e}); run dump-hidden-states again with --repair") from None
        if len(self._open) >= 8:  # bound open mmaps; shards are read in order mostly
            self._open.pop(next(iter(self._open)))
        got = (sf, tok_off, row_off, has_scale)
        self._open[name] = got
        return got

    def get(self, split: str, index: int, dtype: torch.dtype = torch.float32) -> dict:
        """{aux [T, 3H], last_pos [rows], and last [rows, H] (teacher "hidden") or topk_val [rows, k]
        (fp16, shifted so each row's max is 0) + topk_idx [rows, k] (int64 target ids)} of one sample,
        aux and last dequantised to `dtype`."""
        key = (split, int(index))
        if key not in self._where:
            raise KeyError(f"{self.dir}: {split} sample {index} is not in the store")
        rec, j = self._where[key]
        sf, tok_off, row_off, has_scale = self._shard(rec)
        a, b = int(tok_off[j]), int(tok_off[j + 1])
        ra, rb = int(row_off[j]), int(row_off[j + 1])
        aux = sf.get_slice("aux")[a:b]
        scale = sf.get_slice("aux_scale")[a:b] if has_scale else None
        out = {"aux": _dequantize(aux, scale, self.num_aux_layers, dtype),
               "last_pos": sf.get_slice("last_pos")[ra:rb].long()}
        if self.teacher == "topk":
            out["topk_val"] = sf.get_slice("topk_val")[ra:rb]
            out["topk_idx"] = sf.get_slice("topk_idx")[ra:rb].long()
        else:
            out["last"] = sf.get_slice("last")[ra:rb].to(dtype)
        return out

    def batch(self, split: str, indices: list[int], T: int, dtype: torch.dtype = torch.float32,
              lengths: list[int] | None = None):
        """(aux [B, T, 3H], teacher) for these samples, zero-padded. Teacher "hidden": last [B, T, H],
        zero where the store keeps no teacher row (never counted by the TTT). Teacher "topk": a pair
        (values [B, T, k] in `dtype`, ids [B, T, k] int64) for `topk_logits`; rows the store does not
        keep hold the lowest finite value at id 0, so they turn into uniform logits."""
        B, H = len(indices), self.hidden_size
        aux = torch.zeros(B, T, self.num_aux_layers * H, dtype=dtype)
        if self.teacher == "topk":
            vals = torch.full((B, T, self.topk), torch.finfo(dtype).min, dtype=dtype)
            ids = torch.zeros(B, T, self.topk, dtype=torch.int64)
        else:
            last = torch.zeros(B, T, H, dtype=dtype)
        for b, i in enumerate(indices):
            s = self.get(split, i, dtype)
            n = s["aux"].shape[0]
            if lengths is not None and n != lengths[b]:
                raise StoreError(f"{self.dir}: {split} sample {i} has {n} tokens in the store but "
                                 f"{lengths[b]} in the tokenised cache: the store was made from other data")
            aux[b, :n] = s["aux"]
            if self.teacher == "topk":
                vals[b, s["last_pos"]] = s["topk_val"].to(dtype)
                ids[b, s["last_pos"]] = s["topk_idx"]
            else:
                last[b, s["last_pos"]] = s["last"]
        return aux, ((vals, ids) if self.teacher == "topk" else last)


def store_states(run: dict) -> str:
    """What a store's per-token states are: "aux" (captured layers; every store before Medusa) or "last"."""
    st = run.get("states", "aux")
    if st not in STATES:
        raise StoreError(f"unknown store states {st!r} in run.json; expected one of {STATES}")
    return st


def check_store_matches(run: dict, *, target: dict | None = None, cache_key: str | None = None,
                        vocab_size: int | None = None, layer_ids: list[int] | None = None,
                        reads_aux: bool | None = None, draft_type: str | None = None, where: str = "") -> None:
    """Refuse a store made from another target / cache / vocab, or holding states this draft family does
    not read, saying what differs."""
    w = where or "hidden-state store"
    if reads_aux is not None:
        st = store_states(run)
        kind = f"a {draft_type} draft" if draft_type else "this draft"
        if reads_aux and st == "last":
            raise StoreError(f"{w}: holds only the target's last hidden state (dumped with --draft-type "
                             f"{run.get('draft_type', 'medusa')}), but {kind} reads the captured aux layers: dump "
                             "again with dump-hidden-states --draft-type eagle3 (another --output)")
        if not reads_aux and st == "aux":
            raise StoreError(f"{w}: holds captured aux layers (an EAGLE3 dump), but {kind} reads the target's "
                             "last hidden state, which the store does not keep: dump again with dump-hidden-states "
                             f"--draft-type {draft_type or 'medusa'} (another --output)")
    if target is not None:
        st = run.get("target", {})
        if st.get("sha256") != target.get("sha256"):
            raise StoreError(f"{w}: made from target {st.get('resolved')!r} (hash {str(st.get('sha256'))[:12]}), "
                             f"but this run's target is {target.get('resolved')!r} (hash "
                             f"{str(target.get('sha256'))[:12]}): dump again with this target")
    if cache_key is not None and run.get("cache_key") != cache_key:
        raise StoreError(f"{w}: made from tokenised cache {run.get('cache_key')!r}, but this run's data gives cache "
                         f"{cache_key!r} (other data, tokenizer, template or max_length): dump again")
    if vocab_size is not None and int(run.get("vocab_size", -1)) != int(vocab_size):
        raise StoreError(f"{w}: made for a target vocab of {run.get('vocab_size')} ids, this run's target has "
                         f"{vocab_size}")
    if layer_ids is not None and list(run.get("layer_ids", [])) != list(layer_ids):
        raise StoreError(f"{w}: captured layers {run.get('layer_ids')}, this run asks for {list(layer_ids)}")
