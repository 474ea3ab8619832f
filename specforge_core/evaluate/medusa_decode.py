"""In-process Medusa decoding: an HF target verifies what K Medusa heads propose (batch 1).

Medusa heads read the target's final normed hidden state (the lm_head's input) at one position t:
the target's own lm_head gives token t+1, head i gives token t+2+i (models/medusa.py). So no draft
model runs between target forwards, and there is no draft KV cache: each round costs one verify
forward of the target plus K small heads on one hidden vector.

State between rounds (L = tokens in the target's KV cache): the target has processed tokens 0..L-1;
token L (the "pending" token: the bonus of the last round, or the token sampled at prefill) is known
but not yet processed; `h` is the target's final normed hidden state at position L-1, whose lm_head
output gave the pending token. Heads 0..K-1 on `h` propose tokens L+1..L+K.

Candidates, for `steps` heads used (K <= the draft's num_heads) and `topk`:
  chain (topk 1): the top-1 token of each head, K drafts, K+1 tokens verified.
  tree  (topk > 1): Medusa's tree: a node at depth d is one of head d-1's top-k tokens, under any node
      of depth d-1 (the Cartesian product of the heads' top-k lists), scored by the sum of the heads'
      log-probabilities along its path; the `draft_tokens - 1` best nodes (best-first from the root, so
      the set is closed under ancestors) are verified in ONE target forward with a tree attention mask
      and per-node position ids (`spec_decode.verify_inputs`, as the EAGLE3 tree).

Acceptance is `spec_decode.accept_path`, shared with EAGLE3: greedy follows the child equal to the
target's argmax (token-identical to plain greedy decoding); with temperature > 0 the candidates are
deterministic (top-k, not sampled), so the sequential per-child rule keeps the target's distribution
exactly, chain and tree alike. After verification the target's cache keeps the accepted path
(`_keep_cache`), and the hidden state of the last accepted row (the one that gave the bonus) is the
heads' next input.

A config `batch,steps,topk,draft_tokens` means for Medusa: steps = heads used (<= num_heads), topk =
tree width per head, draft_tokens = nodes verified including the root (chain: steps + 1), under the
same `SpecConfig.parse` rules as EAGLE3 so the two families share one config syntax and one table.
"""

from __future__ import annotations

import heapq
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .config import SpecConfig
from .spec_decode import (DraftTree, GenerationResult, TargetRunner, _keep_cache, _pick, _stop_cut, accept_path,
                          verify_inputs)


def medusa_tree(head_logits: Tensor, topk: int, max_nodes: int) -> tuple[list[int], list[int], list[int]]:
    """The candidate tree from the heads' logits [K, Vd] (draft-vocab ids): returns (draft ids, parents
    (-1 = the root), depths), parents before children, siblings in descending score, at most `max_nodes`
    nodes, the best by summed head log-probability along the path (best-first, so ancestor-closed)."""
    K = head_logits.shape[0]
    logp = torch.log_softmax(head_logits.float(), -1)
    lp, ids = logp.topk(min(topk, logp.shape[-1]), dim=-1)          # [K, k]
    lp, ids = lp.tolist(), ids.tolist()
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    heap: list[tuple[float, int, int, int, int]] = []               # (-score, depth, seq, parent, rank)
    seq = 0
    for j in range(len(ids[0])):
        heapq.heappush(heap, (-lp[0][j], 1, seq, -1, j))
        seq += 1
    while heap and len(tokens) < max_nodes:
        neg, depth, _s, parent, j = heapq.heappop(heap)
        tokens.append(ids[depth - 1][j])
        parents.append(parent)
        depths.append(depth)
        me = len(tokens) - 1
        if depth < K:
            for jj in range(len(ids[depth])):
                heapq.heappush(heap, (neg - lp[depth][jj], depth + 1, seq, me, jj))
                seq += 1
    return tokens, parents, depths


class MedusaDecoder:
    """Medusa speculative decoding of one prompt at a time (see the module docstring).

    target: `models.target.Target` (no aux layers are captured; its `layer_ids` are not used);
    draft:  a Medusa draft (`models.registry.build_draft` / `models.serving.load_draft`): `forward(hidden
        [B,T,H]) -> logits [K,B,T,Vd]`, `to_target_ids(draft_ids)`, `num_heads`.
    steps: heads used (<= draft.num_heads); topk: tree width per head; num_draft_tokens: verified nodes
        including the root (default: steps + 1 for a chain, else min(what SpecConfig allows, 8)).
    propose_override: optional `f(tokens) -> logits [steps, Vd]` replacing the heads' output, where
        `tokens` is everything so far including the pending token; the tests build oracle heads with it."""

    def __init__(self, target, draft, steps: int, topk: int = 1, num_draft_tokens: int | None = None,
                 temperature: float = 0.0, propose_override: Callable[[list[int]], Tensor] | None = None):
        if steps < 1 or topk < 1:
            raise ValueError("Medusa decoding needs steps (heads used) >= 1 and topk >= 1 "
                             "(use greedy_generate for 1,0,0,0)")
        if num_draft_tokens is None:
            num_draft_tokens = steps + 1 if topk == 1 else min(SpecConfig.max_tree_nodes(steps, topk) + 1, 8)
        SpecConfig.parse(f"1,{steps},{topk},{num_draft_tokens}")  # same validation as the CLI
        heads = int(getattr(draft, "num_heads", 0) or 0)
        if steps > heads:
            raise ValueError(f"config steps {steps}: the Medusa draft has {heads} heads; a Medusa config's steps "
                             f"field is the number of heads used, at most {heads}")
        if getattr(draft, "vocab_size", target.vocab_size) != target.vocab_size:
            raise ValueError(f"draft vocab_size {draft.vocab_size} differs from the target's {target.vocab_size}")
        H = getattr(draft, "hidden_size", None)
        if H is not None and int(H) != target.hidden_size:
            raise ValueError(f"the Medusa heads read hidden size {H}, the target's is {target.hidden_size}")
        self.target, self.draft = target, draft
        self.steps, self.topk, self.num_draft_tokens = steps, topk, num_draft_tokens
        self.temperature = float(temperature)
        self.propose_override = propose_override
        self.runner = TargetRunner(target)
        self.draft.eval()
        self.dev = target.device
        self._draft_dtype = next(draft.parameters()).dtype

    def head_logits(self, hidden: Tensor) -> Tensor:
        """The first `steps` heads' logits [steps, Vd] for one final normed hidden state [H]."""
        out = self.draft(hidden.to(self._draft_dtype)[None, None])   # [K, 1, 1, Vd]
        return out[: self.steps, 0, 0].float()

    def _tree(self, hidden: Tensor, context: Sequence[int]) -> DraftTree:
        logits = self.head_logits(hidden)
        if self.propose_override is not None:
            logits = self.propose_override(list(context)).to(logits)[: self.steps]
        ids, parents, depths = medusa_tree(logits, self.topk, self.num_draft_tokens - 1)
        tokens = self.draft.to_target_ids(torch.tensor(ids, device=logits.device)).tolist()
        return DraftTree(tokens=[int(t) for t in tokens], parents=parents, depths=depths,
                         draft_probs=[None] * len(tokens))

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Iterable[int] = (),
                 generator: torch.Generator | None = None) -> GenerationResult:
        eos = set(int(e) for e in eos_ids)
        dev, runner = self.dev, self.runner
        t0 = time.perf_counter()
        if not prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        cache = runner.new_cache()
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
        P = prompt.shape[1]
        logits, _, hid = runner.forward(prompt, torch.arange(P, device=dev)[None], cache, capture=False,
                                        last_only=True, return_hidden=True)
        pending = _pick(logits[-1], self.temperature, generator)
        out, why = _stop_cut([pending], [], eos, max_new_tokens)
        res = GenerationResult(tokens=out)
        res.prefill_s = time.perf_counter() - t0
        clock = time.perf_counter
        h = hid[-1]
        L = P
        while why is None:
            t1 = clock()
            tree = self._tree(h, list(prompt_ids) + out if self.propose_override else ())
            res.draft_s += clock() - t1
            ids, positions, allowed = verify_inputs(pending, tree, L, dev)
            t1 = clock()
            vlogits, _, vhid = runner.forward(ids, positions, cache, allowed=allowed, capture=False,
                                              return_hidden=True)
            res.target_s += clock() - t1
            path, bonus = accept_path(tree, vlogits, self.temperature, generator)
            res.verify_steps += 1
            res.accepted.append(len(path))
            rows = [0] + path
            _keep_cache(cache, L, rows)
            new_tokens = [tree.tokens[r - 1] for r in path] + [bonus]
            out, why = _stop_cut(new_tokens, out, eos, max_new_tokens)
            h = vhid[rows[-1]]
            L += len(rows)
            pending = bonus
        res.stopped, res.wall_s = why, time.perf_counter() - t0
        return res
