"""In-process speculative decoding: an HF target verifies what an EAGLE3 draft proposes (batch 1).

One decoding loop serves chain drafting (`topk == 1`: `steps` tokens, `steps + 1` verified per target
forward) and EAGLE-2 dynamic trees (`topk > 1`): at each of `steps` levels every frontier node is
expanded to its `topk` best draft tokens, the `topk` children with the best cumulative draft
log-probability become the next frontier, and at the end the `num_draft_tokens - 1` best nodes of all
levels (ancestor-closed, since a child never scores above its parent) are verified in ONE target
forward with a 4D tree attention mask and per-node position ids (parent + 1).

State between rounds (L = tokens in the target's KV cache): the target has processed tokens 0..L-1,
token L (the "pending" token: the bonus of the last round) is known but not yet processed. The draft
has consumed the pairs (target aux state of token t, embedding of token t+1) at RoPE positions
t = 0..L-1 (docs/ARCHITECTURE.md, "EAGLE3 alignment") and the output of its last pair gives the distribution of
token L+1. A drafted node at depth j sits at position L-1+j in the draft and at L+j in the target.

After verification the target's cache keeps the accepted path (crop for a chain prefix, a gather for
a tree path), the target's aux states of the accepted tokens become the draft's next pairs, and the
draft's temporary tree keys are dropped.

Acceptance rules:
  greedy (temperature 0): follow the child equal to the target's argmax; lossless by construction
      (token-identical to the target's own greedy decoding, up to float noise of batched vs one-token
      forwards, which the tests check is nil in float32).
  sampling, chain: draft tokens are sampled from the draft's distribution q; token d is accepted with
      probability min(1, p(d)/q(d)), else the bonus is sampled from normalise(max(p - q, 0)) (Leviathan
      et al. / Chen et al.). All accepted: the bonus is sampled from p.
  sampling, tree: the tree is drafted deterministically (top-k), so EAGLE's sequential rule applies:
      children are tried in score order, child c is accepted with probability p(c) (p = the current
      residual), a rejected c gets p(c) = 0 and p is renormalised; no child accepted -> the bonus is
      sampled from the residual. Exact in distribution, because the candidates are not random.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from .config import SpecConfig


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """One prompt's generation. `accepted[i]` = draft tokens accepted at verify step i (0..steps)."""

    tokens: list[int]
    verify_steps: int = 0                  # target forwards after the prefill
    accepted: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    stopped: str = "length"                # "eos" or "length"
    # Where the time went (seconds): the prompt's forward(s), the target's decode / verify forwards,
    # the draft's calls (drafting and catching up); the rest of wall_s is the loop's own bookkeeping.
    prefill_s: float = 0.0
    target_s: float = 0.0
    draft_s: float = 0.0

    @property
    def step_tokens(self) -> int:
        """Tokens the verify steps produced (accepted drafts + the bonus each), before eos/length cuts."""
        return sum(a + 1 for a in self.accepted) if self.accepted else self.verify_steps


def acceptance_summary(results: Sequence[GenerationResult], steps: int) -> dict:
    """Acceptance length two ways, and how it is made up.

    `acceptance_length`: tokens the verify steps produced / verify steps, pooled over requests (the
    bonus token counts, so no speculation gives 1.0): what a draft buys per target forward.
    `acceptance_length_sglang`: SGLang's `completion_tokens / spec_verify_ct`, pooled, where
    completion_tokens also holds the token sampled at prefill (no verify step made it) and stops at the
    eos / length cut: compare this one with a server's `spec_accept_length` or our `bench` figure.
    Beside them: the mean of per-request ratios (a different number), per-position acceptance rates
    (position j: share of verify steps that accepted at least j drafts) and the histogram of accepted
    draft counts per verify step."""
    verify = sum(r.verify_steps for r in results)
    toks = sum(r.step_tokens for r in results)
    per_req = [r.step_tokens / r.verify_steps for r in results if r.verify_steps]
    hist = [0] * (steps + 1)
    for r in results:
        for a in r.accepted:
            hist[min(a, steps)] += 1
    n_acc = sum(hist)
    rates = [sum(hist[j:]) / n_acc if n_acc else 0.0 for j in range(1, steps + 1)]
    return {
        "acceptance_length": toks / verify if verify else None,
        "acceptance_length_sglang": sum(len(r.tokens) for r in results) / verify if verify else None,
        "acceptance_length_per_request_mean": sum(per_req) / len(per_req) if per_req else None,
        "verify_steps": verify,
        "verified_tokens": toks,
        "per_position_accept_rate": rates,
        "accept_histogram": {str(j): hist[j] for j in range(steps + 1)},
    }


# ------------------------------------------------------------------------------------------------
# Target side: forward with KV cache, 4D mask and aux-state hooks
# ------------------------------------------------------------------------------------------------
def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _cache_len(cache) -> int:
    return int(cache.get_seq_length())


def _keep_cache(cache, prefix: int, rel: Sequence[int]) -> None:
    """Keep cache positions [0, prefix) and prefix + rel (rel ascending); drop the rest (rejected nodes)."""
    total = _cache_len(cache)
    if list(rel) == list(range(len(rel))):
        remove = total - prefix - len(rel)
        if remove > 0:
            cache.crop(-remove)  # negative: "remove this many from the end" in every transformers version
        return
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(l, "keys") and not getattr(l, "is_sliding", False) for l in layers):
        raise ValueError("tree drafting needs a plain (non sliding-window) DynamicCache on the target to gather "
                         "the accepted path; use a chain (topk 1) with this target")
    dev = layers[0].keys.device
    idx = torch.cat([torch.arange(prefix, device=dev), prefix + torch.as_tensor(list(rel), device=dev)])
    for layer in layers:
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


class TargetRunner:
    """Incremental forwards of an HF causal LM (`specforge_core.models.target.Target`) with a KV cache,
    optionally capturing the aux hidden states of `target.layer_ids` (the draft's inputs)."""

    def __init__(self, target):
        self.target = target
        self.model = target.model
        self.base = target.model.model
        self.layers = self.base.layers
        self.layer_ids = list(target.layer_ids)
        params = inspect.signature(self.base.forward).parameters
        # transformers 5 renamed past_key_values to cache.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def new_cache(self):
        return _new_cache(self.model)

    @torch.inference_mode()
    def forward(self, ids: Tensor, positions: Tensor, cache, allowed: Tensor | None = None,
                capture: bool = True, last_only: bool = False, return_hidden: bool = False):
        """ids, positions [1,n]; allowed: bool [n, n] among the new tokens (None = causal), every new
        token sees the whole cache. Returns logits [n|1, V] (float32) and aux [n, 3H] (or None); with
        `return_hidden` also the final normed hidden state [n|1, H] (the lm_head's input, in the target's
        dtype: what Medusa heads read)."""
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if allowed is not None:
            S = _cache_len(cache)
            n = ids.shape[1]
            full = torch.ones(n, S + n, dtype=torch.bool, device=ids.device)
            full[:, S:] = allowed
            dt = self.target.dtype
            mask = torch.zeros(n, S + n, dtype=dt, device=ids.device).masked_fill(~full, torch.finfo(dt).min)
            kwargs["attention_mask"] = mask[None, None]
        captured: dict[int, Tensor] = {}
        handles = []
        if capture:
            def make_hook(i):
                def hook(_m, _inp, out):
                    captured[i] = out[0] if isinstance(out, (tuple, list)) else out
                return hook
            handles = [self.layers[i].register_forward_hook(make_hook(i)) for i in self.layer_ids]
        try:
            out = self.base(input_ids=ids, position_ids=positions, **kwargs)
        finally:
            for h in handles:
                h.remove()
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        if last_only:
            hidden = hidden[:, -1:]
        logits = self.target.logits_from_hidden(hidden)[0].float()
        aux = torch.cat([captured[i] for i in self.layer_ids], dim=-1)[0] if capture else None
        if return_hidden:
            return logits, aux, hidden[0]
        return logits, aux


def _pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    p = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(p, 1, generator=generator))


def _stop_cut(new: list[int], out: list[int], eos: set[int], max_new: int) -> tuple[list[int], str | None]:
    """Append `new` to `out` up to the first eos (kept) or max_new tokens; returns why it stopped."""
    for t in new:
        out.append(t)
        if t in eos:
            return out, "eos"
        if len(out) >= max_new:
            return out, "length"
    return out, None


@torch.inference_mode()
def greedy_generate(target, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Iterable[int] = (),
                    temperature: float = 0.0, generator: torch.Generator | None = None,
                    runner: TargetRunner | None = None) -> GenerationResult:
    """Plain decoding with a KV cache, one target forward per token: the baseline (and the reference
    the speculative decoder must match token for token at temperature 0)."""
    runner = runner or TargetRunner(target)
    eos = set(int(e) for e in eos_ids)
    dev = target.device
    t0 = time.perf_counter()
    cache = runner.new_cache()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
    P = ids.shape[1]
    logits, _ = runner.forward(ids, torch.arange(P, device=dev)[None], cache, capture=False, last_only=True)
    prefill_s = time.perf_counter() - t0
    target_s = 0.0
    out: list[int] = []
    steps = 0
    tok = _pick(logits[-1], temperature, generator)
    out, why = _stop_cut([tok], out, eos, max_new_tokens)
    while why is None:
        pos = P + len(out) - 1
        t1 = time.perf_counter()
        logits, _ = runner.forward(torch.tensor([[tok]], device=dev), torch.tensor([[pos]], device=dev), cache,
                                   capture=False)
        target_s += time.perf_counter() - t1
        steps += 1
        tok = _pick(logits[-1], temperature, generator)
        out, why = _stop_cut([tok], out, eos, max_new_tokens)
    return GenerationResult(tokens=out, verify_steps=steps, accepted=[0] * steps,
                            wall_s=time.perf_counter() - t0, stopped=why, prefill_s=prefill_s, target_s=target_s)


# ------------------------------------------------------------------------------------------------
# Draft side
# ------------------------------------------------------------------------------------------------
def draft_forward(draft, hidden: Tensor, ids: Tensor, positions: Tensor, past: tuple[Tensor, Tensor] | None,
                  allowed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The decoder's one call into the draft (its family's `draft_step`): out_hidden [1,n,H], logits
    [1,n,Vd] and the n NEW keys / values [1,nkv,n,d] (the caller keeps its own cache)."""
    out, logits, (k, v) = draft.draft_step(hidden, ids, positions, past, allowed)
    n = ids.shape[1]
    return out, logits, k[:, :, -n:], v[:, :, -n:]


@dataclass
class DraftTree:
    """Selected draft nodes in creation order (parents before children)."""

    tokens: list[int]            # target ids
    parents: list[int]           # index into this list, -1 = the root (the pending token)
    depths: list[int]            # 1 = child of the root
    draft_probs: list[Optional[Tensor]] = field(default_factory=list)  # chain sampling: q over the draft vocab


# ------------------------------------------------------------------------------------------------
# Verification, shared by every draft family
# ------------------------------------------------------------------------------------------------
def verify_inputs(pending: int, tree: DraftTree, L: int, device) -> tuple[Tensor, Tensor, Tensor | None]:
    """The verify forward's input: ids [1, 1+M] (the pending token, then the tree's nodes), position ids
    (parent + 1) and the tree attention mask among them (None for a chain: plain causal)."""
    M = len(tree.tokens)
    ids = torch.tensor([[pending] + list(tree.tokens)], device=device)
    positions = torch.tensor([[L] + [L + d for d in tree.depths]], device=device)
    if all(p == i - 1 for i, p in enumerate(tree.parents)):
        return ids, positions, None
    allowed = torch.zeros(M + 1, M + 1, dtype=torch.bool, device=device)
    allowed[:, 0] = True
    for i in range(M):
        allowed[i + 1, i + 1] = True
        a = tree.parents[i]
        while a >= 0:
            allowed[i + 1, a + 1] = True
            a = tree.parents[a]
    return ids, positions, allowed


def accept_path(tree: DraftTree, logits: Tensor, temperature: float, generator, *, sampled_chain: bool = False,
                d2t_ids=None) -> tuple[list[int], int]:
    """logits [1+M, V] of the verify forward (row 0 = root). Returns (accepted verify rows after the root,
    bonus token); see the module docstring for the rules. `sampled_chain`: the drafts were sampled from
    `tree.draft_probs` (over the draft vocab, mapped to target ids by `d2t_ids`), so min(1, p/q) applies;
    otherwise the candidates are deterministic and the sequential per-child rule is exact."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents):
        children.setdefault(p + 1, []).append(i + 1)   # verify rows: root 0, node i -> i + 1
    path: list[int] = []
    cur = 0
    if temperature <= 0:
        while True:
            want = int(torch.argmax(logits[cur]))
            nxt = next((c for c in children.get(cur, []) if tree.tokens[c - 1] == want), None)
            if nxt is None:
                return path, want
            path.append(nxt)
            cur = nxt
    temp = temperature
    if sampled_chain:   # chain with sampled drafts: the standard min(1, p/q) rule
        while True:
            p = torch.softmax(logits[cur] / temp, -1)
            kids = children.get(cur, [])
            if not kids:
                return path, int(torch.multinomial(p, 1, generator=generator))
            c = kids[0]
            tok = tree.tokens[c - 1]
            q_draft = tree.draft_probs[c - 1]
            q = torch.zeros_like(p)
            q[d2t_ids(torch.arange(q_draft.shape[0], device=q.device))] = q_draft.to(p.dtype)
            u = torch.rand((), generator=generator, device=p.device)
            if float(u) < min(1.0, float(p[tok]) / max(float(q[tok]), 1e-30)):
                path.append(c)
                cur = c
                continue
            resid = (p - q).clamp_min(0)
            resid = resid / resid.sum() if float(resid.sum()) > 0 else p
            return path, int(torch.multinomial(resid, 1, generator=generator))
    while True:   # deterministic candidates: sequential per-child rule
        p = torch.softmax(logits[cur] / temp, -1)
        accepted = None
        for c in children.get(cur, []):   # creation order = descending draft score among siblings
            tok = tree.tokens[c - 1]
            u = torch.rand((), generator=generator, device=p.device)
            if float(u) < float(p[tok]):
                accepted = c
                break
            p = p.clone()
            p[tok] = 0
            s = float(p.sum())
            if s <= 0:
                break
            p = p / s
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
        cur = accepted


# ------------------------------------------------------------------------------------------------
# The decoder
# ------------------------------------------------------------------------------------------------
class SpecDecoder:
    """EAGLE3 speculative decoding of one prompt at a time (see the module docstring).

    target: `models.target.Target` (its layer_ids must be the draft's aux layers);
    draft:  an EAGLE3 draft (`models.registry.build_draft`) with the target's embedding loaded and d2t set.
    propose_override: optional `f(tokens) -> logits [draft_vocab]` that replaces the draft's logits for
        the query whose context is `tokens` (all target ids so far, drafted path included). The draft
        still runs (its keys and hidden states are used as usual); this is how the tests build an
        oracle draft (the target's own next-token function) and measure the ceiling of a config."""

    def __init__(self, target, draft, steps: int, topk: int = 1, num_draft_tokens: int | None = None,
                 temperature: float = 0.0, propose_override=None):
        if steps < 1 or topk < 1:
            raise ValueError("speculative decoding needs steps >= 1 and topk >= 1 (use greedy_generate for 1,0,0,0)")
        if num_draft_tokens is None:
            num_draft_tokens = steps + 1 if topk == 1 else min(SpecConfig.max_tree_nodes(steps, topk) + 1, 8)
        SpecConfig.parse(f"1,{steps},{topk},{num_draft_tokens}")  # same validation as the CLI
        self.target, self.draft = target, draft
        self.steps, self.topk, self.num_draft_tokens = steps, topk, num_draft_tokens
        self.temperature = float(temperature)
        self.propose_override = propose_override
        self.runner = TargetRunner(target)
        H_t = getattr(draft, "target_hidden_size", None)
        if H_t and H_t * 3 != len(target.layer_ids) * target.hidden_size:
            raise ValueError(f"the draft reads 3 x {H_t} target features but the target gives "
                             f"{len(target.layer_ids)} x {target.hidden_size}")
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"draft vocab_size {draft.vocab_size} differs from the target's {target.vocab_size}")
        self.draft.eval()
        self.d2t = draft.d2t
        self.dev = target.device

    # -- drafting --------------------------------------------------------------------------------
    def _tree(self, past, root_hidden: Tensor, root_logits: Tensor, root_pos: int,
              generator: torch.Generator | None, context: Sequence[int] = ()) -> DraftTree:
        """Build the draft tree (or chain) after the root; root_hidden [1,H], root_logits [Vd];
        context: every token so far (prompt, output, the pending one), for `propose_override`."""
        draft, k_top, dev = self.draft, self.topk, root_hidden.device
        override = self.propose_override
        sample_chain = self.temperature > 0 and k_top == 1
        S = past[0].shape[2]
        tokens: list[int] = []   # draft-vocab ids for now
        parents: list[int] = []
        depths: list[int] = []
        scores: list[float] = []
        qs: list[Optional[Tensor]] = []

        def propose(logits: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
            """logits [m,Vd] -> (ids [m,k], logp [m,k], q [m,Vd] when sampling a chain)."""
            if sample_chain:
                q = torch.softmax(logits.float() / self.temperature, -1)
                ids = torch.multinomial(q, 1, generator=generator)
                return ids, torch.log(q.gather(1, ids)), q
            logp = torch.log_softmax(logits.float(), -1)
            lp, ids = logp.topk(k_top, dim=-1)
            return ids, lp, None

        def path_of(n: int) -> list[int]:
            toks = []
            while n >= 0:
                toks.append(int(self.d2t_ids(torch.tensor(tokens[n]))))
                n = parents[n]
            return list(context) + toks[::-1]

        if override is not None:
            root_logits = override(list(context)).to(root_logits)
        ids, lp, q = propose(root_logits[None])
        frontier = []   # (node index, hidden of the query that proposed it)
        for j in range(ids.shape[1]):
            tokens.append(int(ids[0, j])); parents.append(-1); depths.append(1); scores.append(float(lp[0, j]))
            qs.append(q[0] if q is not None else None)
            frontier.append((len(tokens) - 1, root_hidden[0]))
        slot: dict[int, int] = {}          # node index -> its position among the temporary draft keys
        tmp_k: list[Tensor] = []
        tmp_v: list[Tensor] = []
        for level in range(1, self.steps):
            m = len(frontier)
            nodes = [n for n, _ in frontier]
            hid = torch.stack([h for _, h in frontier])[None]                                   # [1,m,H]
            tok_t = self.d2t_ids(torch.tensor([tokens[n] for n in nodes], device=dev))[None]   # [1,m]
            pos = torch.full((1, m), root_pos + level, dtype=torch.long, device=dev)
            T = len(tmp_k) and sum(t.shape[2] for t in tmp_k)
            allowed = torch.zeros(m, S + T + m, dtype=torch.bool, device=dev)
            allowed[:, :S] = True
            for r, n in enumerate(nodes):
                a = parents[n]
                while a >= 0:
                    allowed[r, S + slot[a]] = True
                    a = parents[a]
                allowed[r, S + T + r] = True
            pk = torch.cat([past[0], *tmp_k], 2) if tmp_k else past[0]
            pv = torch.cat([past[1], *tmp_v], 2) if tmp_v else past[1]
            out, logits, kk, vv = draft_forward(draft, hid, tok_t, pos, (pk, pv), allowed)
            if override is not None:
                logits = torch.stack([override(path_of(n)).to(logits) for n in nodes])[None]
            tmp_k.append(kk); tmp_v.append(vv)
            for r, n in enumerate(nodes):
                slot[n] = T + r
            ids, lp, q = propose(logits[0])                                                      # [m,k]
            cand = []
            for r, n in enumerate(nodes):
                for j in range(ids.shape[1]):
                    tokens.append(int(ids[r, j])); parents.append(n); depths.append(level + 1)
                    scores.append(scores[n] + float(lp[r, j]))
                    qs.append(q[r] if q is not None else None)
                    cand.append((len(tokens) - 1, out[0, r]))
            # EAGLE-2: only the best `topk` children (by cumulative log-prob) are expanded further.
            cand.sort(key=lambda c: -scores[c[0]])
            frontier = cand[:k_top]
        keep_n = self.num_draft_tokens - 1
        # A child never scores above its parent and ties go to the shallower node, so any prefix of
        # this order is closed under ancestors.
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i], i))[:keep_n]
        keep = sorted(order)
        remap = {old: new for new, old in enumerate(keep)}
        sel_tokens = self.d2t_ids(torch.tensor([tokens[i] for i in keep], device=dev)).tolist()
        return DraftTree(tokens=sel_tokens, parents=[remap[parents[i]] if parents[i] >= 0 else -1 for i in keep],
                         depths=[depths[i] for i in keep], draft_probs=[qs[i] for i in keep])

    def d2t_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids + self.d2t[draft_ids]

    # -- acceptance --------------------------------------------------------------------------------
    def _accept(self, tree: DraftTree, logits: Tensor, generator) -> tuple[list[int], int]:
        """logits [1+M, V] of the verify forward (row 0 = root). Returns (accepted verify rows after the
        root, bonus token). A sampled chain (topk 1) uses min(1, p/q); trees use the sequential rule."""
        return accept_path(tree, logits, self.temperature, generator, sampled_chain=self.topk == 1,
                           d2t_ids=self.d2t_ids)

    # -- the loop ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Iterable[int] = (),
                 generator: torch.Generator | None = None) -> GenerationResult:
        eos = set(int(e) for e in eos_ids)
        dev, draft, runner = self.dev, self.draft, self.runner
        t0 = time.perf_counter()
        if not prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        cache = runner.new_cache()
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
        P = prompt.shape[1]
        logits, aux = runner.forward(prompt, torch.arange(P, device=dev)[None], cache)
        pending = _pick(logits[-1], self.temperature, generator)
        out, why = _stop_cut([pending], [], eos, max_new_tokens)
        res = GenerationResult(tokens=out)
        if why is not None:
            res.stopped, res.wall_s = why, time.perf_counter() - t0
            res.prefill_s = res.wall_s
            return res
        # Draft prefill: pairs (aux_t, token t+1) for t = 0..P-1.
        nxt = torch.cat([prompt[:, 1:], torch.tensor([[pending]], device=dev)], 1)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        hout, dlogits, dk, dv = draft_forward(draft, aux[None], nxt, torch.arange(P, device=dev)[None], None, causal)
        past = (dk, dv)
        res.prefill_s = time.perf_counter() - t0   # the target's and the draft's prompt forwards
        clock = time.perf_counter
        root_h, root_logits = hout[:, -1], dlogits[0, -1]
        L = P
        while why is None:
            t1 = clock()
            tree = self._tree(past, root_h, root_logits, L - 1, generator,
                              context=list(prompt_ids) + out if self.propose_override else ())
            res.draft_s += clock() - t1
            ids, positions, allowed = verify_inputs(pending, tree, L, dev)
            t1 = clock()
            vlogits, vaux = runner.forward(ids, positions, cache, allowed=allowed)
            res.target_s += clock() - t1
            path, bonus = self._accept(tree, vlogits, generator)
            res.verify_steps += 1
            res.accepted.append(len(path))
            rows = [0] + path
            _keep_cache(cache, L, rows)
            new_tokens = [tree.tokens[r - 1] for r in path] + [bonus]
            out, why = _stop_cut(new_tokens, out, eos, max_new_tokens)
            if why is not None:
                break
            # The draft's next pairs: (aux of each accepted token, the token after it).
            n = len(rows)
            nxt = torch.tensor([new_tokens], device=dev)
            pos = torch.arange(L, L + n, device=dev)[None]
            t1 = clock()
            allowed_d = torch.ones(n, past[0].shape[2] + n, dtype=torch.bool, device=dev).tril(past[0].shape[2])
            hout, dlogits, dk, dv = draft_forward(draft, vaux[rows][None], nxt, pos, past, allowed_d)
            past = (torch.cat([past[0], dk], 2), torch.cat([past[1], dv], 2))
            res.draft_s += clock() - t1
            root_h, root_logits = hout[:, -1], dlogits[0, -1]
            L += n
            pending = bonus
        res.stopped, res.wall_s = why, time.perf_counter() - t0
        return res
