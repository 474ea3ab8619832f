"""In-process regeneration backend: HF `generate` on a small target, without any server.

Why: the embedded default target (SmolLM2-135M-Instruct) and other small models should regenerate
data on a laptop CPU, with the same outputs and the same resume semantics as the server path.
Prompts are rendered with the tokenizer's own chat template, sorted by length and generated in
left-padded batches, so a batch wastes little compute on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LocalReply:
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning: Optional[str] = None


class LocalGenerator:
    def __init__(self, model: str = "default", device: str = "auto", batch_size: int = 8, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        from ..targets import load_tokenizer, resolve_model

        path = resolve_model(model)
        self.tokenizer = load_tokenizer(model)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{model}: its tokenizer has no chat template; the local backend renders "
                             "conversations with it")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.generator_seed = seed
        torch.manual_seed(seed)
        eos = set()
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            eos.update(int(x) for x in gen_eos)
        if not eos:
            raise ValueError(f"{model}: neither the tokenizer nor the generation config names an end-of-turn token")
        self.eos_ids = sorted(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

    def render(self, messages: list[dict], disable_thinking: bool = False) -> list[int]:
        kw = {"enable_thinking": False} if disable_thinking else {}
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: list[list[dict]], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, disable_thinking: bool = False,
                 should_stop=None) -> list[LocalReply]:
        """One reply per conversation, in input order. `should_stop()` is polled between batches; when
        it returns True the remaining replies are None."""
        import torch

        prompts = [self.render(m, disable_thinking) for m in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[Optional[LocalReply]] = [None] * len(prompts)
        for b in range(0, len(order), self.batch_size):
            if should_stop is not None and should_stop():
                break
            idx = order[b:b + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = prompts[i]
                ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[r, width - len(p):] = 1
            kw = dict(max_new_tokens=max_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
            if temperature > 0:
                kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw)
            new = out[:, width:].tolist()
            for r, i in enumerate(idx):
                toks = new[r]
                finish = "length"
                for k, t in enumerate(toks):
                    if t in self.eos_ids:
                        toks, finish = toks[:k], "stop"
                        break
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                for s in stop or []:
                    j = text.find(s)
                    if j >= 0:
                        text, finish = text[:j], "stop"
                replies[i] = LocalReply(content=text, finish_reason=finish, prompt_tokens=len(prompts[i]),
                                        completion_tokens=len(toks))
        return replies
