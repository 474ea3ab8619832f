"""Training's view of acceptance beside serving's, on the same text.

After `evaluate` has decoded its prompts, the target's own greedy answers are run once more, teacher-forced,
through the training-time test (`models.ttt.ttt_forward`, the code the trainer scores held-out data with).
That gives, per answer position t, how many leading draft steps of a chain anchored at t are right
(`TTTOutput.run_lengths`). Two figures per greedy chain config (`steps` drafts, topk 1) come out of it:

- `acceptance_length`: 1 + the mean over every anchor of min(run, steps): the held-out simulated acceptance
  length the trainer reports, computed on the benchmark's own answers instead of the training split. Beside
  the in-process figure it separates "the trainer's metric does not predict serving" from "the benchmark's
  text is not like the training data": the recipe's calibration table shows both.
- `agreement`: the in-process decoder's verify steps replayed against the runs: the share of steps where
  min(run at the step's anchor, steps) equals the drafts the decoder accepted. 1.0 means training and serving
  see the same draft: same features, same positions, same attention, same vocab mapping; a drop names a
  mismatch (or float noise flipping a near-tie).

Anchors: the prefill gives the first answer token; the first verify step drafts from the prompt's last
position, whose step 0 predicts answer token 1. A step that accepted `a` drafts moves the anchor by a + 1.
Steps whose drafts would run past the text (eos, length cut) are not replayed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models.ttt import ttt_forward
from .spec_decode import GenerationResult, SpecConfig

DEFINITION = ("teacher_forced: the target's greedy answers run through the training-time test (TTT); "
              "acceptance_length = 1 + mean over answer positions of min(leading right draft steps, steps), the "
              "trainer's simulated acceptance length on this text; agreement = share of in-process verify steps "
              "whose accepted drafts the TTT predicts exactly (1.0: training and serving see the same draft)")


@torch.no_grad()
def answer_runs(target, draft, prompt: Sequence[int], tokens: Sequence[int], ttt_length: int) -> list[int]:
    """Run lengths for the chains anchored at answer positions: entry i is the anchor whose step 0
    predicts tokens[i + 1] (len(tokens) - 1 entries; the last ones are cut short by the text's end)."""
    device = next(draft.parameters()).device
    ids = torch.tensor([list(prompt) + list(tokens)], device=device)                  # [1, T]
    am = torch.ones_like(ids)
    lm = torch.zeros_like(ids)
    lm[0, len(prompt):] = 1
    cap = target.capture(ids, am)
    out = ttt_forward(draft, ids, cap.aux_hidden.to(ids.device), cap.logits, lm, am, ttt_length=ttt_length)
    return out.run_lengths[0, len(prompt) - 1:].tolist()


def replay(runs: Sequence[int], result: GenerationResult, steps: int) -> tuple[int, int]:
    """(steps replayed, steps whose accepted count the runs predict exactly) for one greedy chain generation."""
    i, seen, same = 0, 0, 0
    n = len(result.tokens)
    for a in result.accepted:
        if i + steps >= n or i >= len(runs):
            break                       # its drafts would run past the text: the runs cannot see them
        seen += 1
        same += int(min(runs[i], steps) == a)
        i += a + 1
    return seen, same


def teacher_forced(target, draft, prompts: Sequence[Sequence[int]], baseline: Sequence[GenerationResult],
                   specs: Sequence[SpecConfig], outputs: dict[str, Sequence[GenerationResult]] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   cancelled: Callable[[], bool] | None = None,
                   categories: Sequence[str | None] | None = None) -> dict[str, dict]:
    """Per greedy chain config label: {acceptance_length, anchors, agreement, replayed_steps}, and where the
    prompts have `categories`, the same per category under `by_category`. `outputs` (per label, the decoder's
    generations) are replayed where they equal the baseline's (otherwise their text is not the one simulated);
    without them nothing is replayed and `agreement` is None."""
    chains = [s for s in specs if s.speculative and s.topk == 1]
    if not chains:
        return {}
    K = max(s.steps for s in chains)
    cats = list(categories) if categories is not None else [None] * len(prompts)
    # (label, category or None for all) -> [sum of min(run, steps), anchors, replayed, agreed]
    acc: dict[tuple[str, str | None], list[int]] = {}
    for p, (ids, base) in enumerate(zip(prompts, baseline)):
        if cancelled is not None and cancelled():
            break
        runs = answer_runs(target, draft, ids, base.tokens, K)
        for s in chains:
            usable = runs[:max(len(base.tokens) - s.steps, 0)]    # anchors whose `steps` drafts all lie in the text
            mine = outputs[s.label][p] if outputs is not None else None
            seen, same = replay(runs, mine, s.steps) if mine is not None and mine.tokens == base.tokens else (0, 0)
            for key in {(s.label, None), (s.label, cats[p])}:
                a = acc.setdefault(key, [0, 0, 0, 0])
                a[0] += sum(min(r, s.steps) for r in usable)
                a[1] += len(usable)
                a[2] += seen
                a[3] += same
        if progress is not None:
            progress(p + 1, len(prompts))

    def row(a: list[int]) -> dict:
        return {"acceptance_length": 1 + a[0] / a[1] if a[1] else None, "anchors": a[1],
                "agreement": a[3] / a[2] if a[2] else None, "replayed_steps": a[2]}

    out = {s.label: row(acc.get((s.label, None), [0, 0, 0, 0])) for s in chains}
    if any(c is not None for c in cats):
        for s in chains:
            out[s.label]["by_category"] = {c: row(a) for (label, c), a in acc.items() if label == s.label and c}
    return out
