"""In-process regeneration backend: batched decoding on a small target, without any server.

Why: the embedded default target (SmolLM2-135M-Instruct) and other small models should regenerate
data on a laptop CPU, with the same outputs and the same resume semantics as the server path.

Two decoders:
  fast (Llama-style models: llama, and qwen2/mistral without sliding window): our own decode loop over
      the model's weights with continuous batching. Prompts are sorted by length; up to `batch_size`
      sequences decode together, each in its own slot of a preallocated KV cache (no per-step cache
      concatenation, no attention over left padding); a finished sequence frees its slot and the next
      prompt is prefilled into it at once (or, with `admit_min` > 1, once that many slots are free), so
      the batch stays full. Greedy tokens equal a plain
      one-sequence greedy loop (tests/test_regen_local.py checks this against HF `generate`).
  hf (any other model, or `decoder="hf"`): HF `generate` in left-padded batches of `batch_size`.

Measured on the shared 2-core CPU with SmolLM2, GSM8K prompts, max 256 tokens, 1 torch thread
(bench/regen_local.py, forward = batch 8 x 256 in the same process): HF generate in batches of 8 made
28.5 generated tokens/s = 0.11 of the forward rate; the fast decoder at batch 64 made 107 tokens/s =
0.41 (0.61 counting the prompt tokens it also runs), with the same tokens. Decode is bound by GEMM
efficiency at small batch (bigger batches help: per-step decode rate 0.37 of forward at 64 slots,
0.48 at 96) and by memory bandwidth for attention over the fp32 cache. Under CPU contention keep
torch at 1 thread (OMP_NUM_THREADS=1): 2 threads on an oversubscribed 2-core box is several times slower.

Linear kernels: on a CPU with AMX / AVX512-BF16, `linear_kernel=auto` runs every projection and the
lm_head as a prepacked oneDNN bf16 matmul (`cpu_kernels`, the kernels `evaluate` uses), norms,
attention and the KV cache in fp32. Same bench, 128 GSM8K prompts, batch 64, 2 threads, both kernels in
one run (`--kernels native onednn-bf16`): 196 -> 328 generated tokens/s (1.67x; 0.55 of the fp32 forward
rate). Greedy answers are then the target's under bf16 rounding: 25 of 128 replies were identical to the
fp32 ones over 256 tokens, the others part ways somewhere along the way (as a bf16 server's would).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

FAST_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class LocalReply:
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    token_ids: list[int] = field(default_factory=list)   # the generated ids (end-of-turn excluded), before a stop cut


def fast_decoder_supported(config) -> str | None:
    """None when `_FastDecoder` reproduces this model's forward; else the reason it does not."""
    mt = getattr(config, "model_type", None)
    if mt not in FAST_MODEL_TYPES:
        return f"model type {mt!r} (fast decoder: {', '.join(FAST_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        return "length-dependent RoPE scaling"
    if mt == "qwen2" and getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if mt == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding-window attention"
    if getattr(config, "mlp_bias", False):
        return "MLP bias"
    return None


class _FastDecoder:
    """Continuous-batching decoder for Llama-style decoder-only models (see the module docstring).

    The KV cache is one tensor per K and V, [layers, slots, kv_heads, cap, head_dim]; slot s holds
    `lens[s]` valid positions. It is reallocated (occupied slots copied, compacted) only when the
    capacity must grow for a longer prompt, when the memory budget allows fewer slots, or when the
    queue is drained and at most half the slots are still busy.
    """

    def __init__(self, model, kv_budget_mb: float = 3072, linear_kernel: str = "native"):
        """`linear_kernel`: native (F.linear on the model's weights), onednn-bf16 or onednn-fp32 (every
        projection and the lm_head as a prepacked oneDNN matmul, `cpu_kernels`; CPU, fp32 models)."""
        import torch

        cfg = model.config
        self.torch = torch
        base = model.model
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.n_heads // self.n_kv
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.embed = base.embed_tokens.weight
        self.norm_w = base.norm.weight
        F = torch.nn.functional
        from functools import partial

        from ..cpu_kernels import PACKED_KERNELS, PackedLinear

        if linear_kernel in PACKED_KERNELS:
            lin = partial(PackedLinear, dtype=PACKED_KERNELS[linear_kernel])
        elif linear_kernel == "native":
            def lin(w, b=None):
                return lambda x: F.linear(x, w, b)
        else:
            raise ValueError(f"linear_kernel must be native or one of {', '.join(PACKED_KERNELS)}, "
                             f"not {linear_kernel!r}")
        self.linear_kernel = linear_kernel
        self.lm_head = lin(model.lm_head.weight, getattr(model.lm_head, "bias", None))
        self.rotary = base.rotary_emb
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.splits = (q_out, kv_out, kv_out)
        self.inter = cfg.intermediate_size
        self.layers = []
        with torch.no_grad():
            for layer in base.layers:
                at, mlp = layer.self_attn, layer.mlp
                # Fused q|k|v and gate|up projections: fewer, larger matrix products per step.
                wqkv = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight], 0).contiguous()
                bqkv = None
                if at.q_proj.bias is not None:
                    bqkv = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias], 0).contiguous()
                wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0).contiguous()
                # Each projection as a callable x -> x W^T (+ b), under the chosen kernel.
                self.layers.append((layer.input_layernorm.weight, lin(wqkv, bqkv),
                                    lin(at.o_proj.weight, getattr(at.o_proj, "bias", None)),
                                    layer.post_attention_layernorm.weight, lin(wgu), lin(mlp.down_proj.weight)))
        self.bytes_per_token = 2 * self.n_layers * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8
        self.budget_tokens = max(1, int(kv_budget_mb * 2 ** 20) // self.bytes_per_token)
        self._rope_len = 0
        self.reuse_prefix = True
        # Admit waiting prompts only once this many slots are free (fewer at the queue's tail), so that
        # short requests ending one by one do not each cost a prefill call. Measured on SmolLM2 self-instruct
        # requests (bench/self_instruct_calls.py --admit-min 1 8, an AVX2 CPU): 8 gave the same generated
        # tokens/s as 1 (76.4 vs 76.1), so the default refills at once.
        self.admit_min = 1
        self.attn = "sdpa"  # CPU flash kernel: as fast as batched matmuls alone, far faster under 2 threads
        self._cos = self._sin = None

    # -------------------------------------------------------------------------------------------
    # model pieces
    # -------------------------------------------------------------------------------------------
    def _rms(self, x, w):
        torch = self.torch
        dt = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x.to(dt)

    def _rope_table(self, n: int):
        """cos/sin for positions [0, n), from the model's own rotary module (so its scaling applies)."""
        if n > self._rope_len:
            n = max(n, 2 * self._rope_len, 256)
            pos = self.torch.arange(n, device=self.device)[None]
            probe = self.torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(probe, pos)
            self._cos, self._sin, self._rope_len = cos[0], sin[0], n
        return self._cos, self._sin

    def _mlp(self, h, gate_up, down):
        F = self.torch.nn.functional
        g, u = gate_up(h).split(self.inter, dim=-1)
        return down(F.silu(g) * u)

    def _attend(self, q, k, v, bias):
        """softmax(q k^T * scale + bias) v with batched matmuls; q [S, kv, g, D], k/v [S, kv, span, D]
        (strided views of the cache), bias [S, 1, 1, span] (0 or -inf)."""
        torch = self.torch
        if self.attn == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        w = torch.matmul(q * self.scale, k.transpose(-1, -2)) + bias
        return torch.matmul(w.softmax(dim=-1), v)

    def _logits(self, h):
        return self.lm_head(self._rms(h, self.norm_w))

    def prefill(self, k_cache, v_cache, slots: list[int], prompts: list[list[int]], prefix=None):
        """Run the prompts (right-padded together) and write their K/V into `slots`; returns the
        next-token logits [n, vocab]. `prefix` = (c, K [layers, kv, c, D], V): the first c tokens of every
        prompt are already computed (the shared chat-template head); only the rest is run."""
        torch = self.torch
        F = torch.nn.functional
        c = 0 if prefix is None else prefix[0]
        n, width = len(prompts), max(len(p) for p in prompts) - c
        ids = torch.zeros((n, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, :len(p) - c] = torch.tensor(p[c:], dtype=torch.long)
        ids = ids.to(self.device)
        lens = torch.tensor([len(p) - c for p in prompts], device=self.device)
        slot_idx = torch.tensor(slots, device=self.device)
        cos, sin = self._rope_table(c + width)
        cos, sin = cos[c:c + width], sin[c:c + width]  # [width, D], broadcast over batch and heads
        mask = None
        if c:
            # Every suffix position sees the whole prefix, and the suffix causally.
            i = torch.arange(width, device=self.device)
            mask = torch.cat([torch.ones((width, c), dtype=torch.bool, device=self.device),
                              i[None, :] <= i[:, None]], dim=1)
        x = F.embedding(ids, self.embed)
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        for li, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            h = self._rms(x, ln1)
            q, k, v = qkv(h).split(self.splits, dim=-1)
            q = q.view(n, width, nh, hd).transpose(1, 2)
            k = k.view(n, width, nkv, hd).transpose(1, 2)
            v = v.view(n, width, nkv, hd).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k_cache[li, slot_idx, :, c:c + width] = k
            v_cache[li, slot_idx, :, c:c + width] = v
            if c:
                k_cache[li, slot_idx, :, :c] = prefix[1][li]
                v_cache[li, slot_idx, :, :c] = prefix[2][li]
                k, v = k_cache[li, slot_idx, :, :c + width], v_cache[li, slot_idx, :, :c + width]
            # Right padding: causal attention keeps every real position away from the pads after it.
            if self.group > 1:
                k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
            if c:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            x = x + o_proj(a.transpose(1, 2).reshape(n, width, nh * hd))
            x = x + self._mlp(self._rms(x, ln2), gate_up, down)
        last = x[torch.arange(n, device=self.device), lens - 1]
        return self._logits(last)

    def shared_prefix(self, prompts: list[list[int]], min_len: int = 8):
        """(c, K, V) for the longest token prefix all prompts share (at least one token of each prompt
        is left to run), computed once; None when it is shorter than `min_len` or there is one prompt."""
        torch = self.torch
        if len(prompts) < 2:
            return None
        first, c = prompts[0], min(len(p) for p in prompts) - 1
        for p in prompts[1:]:
            k = 0
            while k < c and p[k] == first[k]:
                k += 1
            c = k
            if c < min_len:
                return None
        shape = (self.n_layers, 1, self.n_kv, c, self.head_dim)
        kc = torch.zeros(shape, dtype=self.dtype, device=self.device)
        vc = torch.zeros_like(kc)
        self.prefill(kc, vc, [0], [first[:c]])
        return c, kc[:, 0], vc[:, 0]

    def decode(self, k_cache, v_cache, tokens, lens):
        """One step for every slot: `tokens` [S] at positions `lens` [S]; returns logits [S, vocab]."""
        torch = self.torch
        F = torch.nn.functional
        S = tokens.shape[0]
        hd, nh, nkv, g = self.head_dim, self.n_heads, self.n_kv, self.group
        span = int(lens.max()) + 1
        cos, sin = self._rope_table(span)
        cos, sin = cos[lens][:, None, :], sin[lens][:, None, :]  # [S, 1, D]
        mask = (torch.arange(span, device=self.device)[None, :] <= lens[:, None])[:, None, None, :]
        bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(~mask, float("-inf"))
        cap = k_cache.shape[3]
        flat = ((torch.arange(S, device=self.device)[:, None] * nkv + torch.arange(nkv, device=self.device)) * cap
                + lens[:, None]).reshape(-1)
        x = F.embedding(tokens, self.embed)  # [S, hidden]
        for li, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            h = self._rms(x, ln1)
            q, k, v = qkv(h).split(self.splits, dim=-1)
            q = _rotate(q.view(S, nh, hd), cos, sin)
            k = _rotate(k.view(S, nkv, hd), cos, sin)
            # Write this step's K/V at each slot's own position (index_copy_ on a flat view is far
            # cheaper than advanced-index assignment).
            k_cache[li].view(-1, hd).index_copy_(0, flat, k.reshape(S * nkv, hd))
            v_cache[li].view(-1, hd).index_copy_(0, flat, v.reshape(S * nkv, hd))
            # Grouped-query attention without copying K/V: the `group` query heads that share a KV head
            # act as `group` query positions over the same keys (one position per sequence, one mask).
            a = self._attend(q.view(S, nkv, g, hd), k_cache[li, :, :, :span], v_cache[li, :, :, :span], bias)
            x = x + o_proj(a.reshape(S, nh * hd))
            x = x + self._mlp(self._rms(x, ln2), gate_up, down)
        return self._logits(x)

    # -------------------------------------------------------------------------------------------
    # scheduling
    # -------------------------------------------------------------------------------------------
    def run(self, prompts: list[list[int]], max_tokens: int, eos_ids: list[int], batch_size: int,
            pick: Callable, should_stop=None, on_done=None) -> list[tuple[list[int], str] | None]:
        """Generate for every prompt; returns (tokens without the end token, finish reason) per prompt,
        None for those not finished when `should_stop()` turned True (polled every step).
        `pick(logits [n, vocab]) -> LongTensor [n]` chooses the next tokens."""
        torch = self.torch
        results: list[tuple[list[int], str] | None] = [None] * len(prompts)
        if max_tokens <= 0:
            return [([], "length") for _ in prompts]
        eos = set(eos_ids)
        prefix = self.shared_prefix(prompts) if self.reuse_prefix else None
        queue = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        qpos = 0
        n_layers, nkv, hd = self.n_layers, self.n_kv, self.head_dim
        S = cap = 0
        k_cache = v_cache = None
        slot_req: list[int] = []  # request index per slot, -1 when free
        lens = torch.zeros(0, dtype=torch.long, device=self.device)
        last = torch.zeros(0, dtype=torch.long, device=self.device)
        outs: dict[int, list[int]] = {}

        def need(i: int) -> int:
            return -(-(len(prompts[i]) + max_tokens) // 32) * 32

        def reshape(new_s: int, new_cap: int):
            nonlocal S, cap, k_cache, v_cache, slot_req, lens, last
            busy = [s for s in range(S) if slot_req[s] >= 0]
            assert len(busy) <= new_s
            # Zeros, not empty: masked positions get weight 0, and 0 * NaN garbage would still be NaN.
            kc = torch.zeros((n_layers, new_s, nkv, new_cap, hd), dtype=self.dtype, device=self.device)
            vc = torch.zeros_like(kc)
            new_lens = torch.zeros(new_s, dtype=torch.long, device=self.device)
            new_last = torch.zeros(new_s, dtype=torch.long, device=self.device)
            if busy:
                src = torch.tensor(busy, device=self.device)
                keep = min(cap, new_cap, int(lens[src].max()) + 1)
                kc[:, :len(busy), :, :keep] = k_cache[:, src, :, :keep]
                vc[:, :len(busy), :, :keep] = v_cache[:, src, :, :keep]
                new_lens[:len(busy)] = lens[src]
                new_last[:len(busy)] = last[src]
            slot_req = [slot_req[s] for s in busy] + [-1] * (new_s - len(busy))
            k_cache, v_cache, lens, last, S, cap = kc, vc, new_lens, new_last, new_s, new_cap

        def finish(s: int, reason: str):
            i = slot_req[s]
            results[i] = (outs.pop(i), reason)
            slot_req[s] = -1
            lens[s] = 0
            if on_done is not None:
                on_done(i, results[i])

        def accept(slots: list[int], toks: list[int]):
            for s, t in zip(slots, toks):
                i = slot_req[s]
                if t in eos:
                    finish(s, "stop")
                    continue
                outs[i].append(t)
                if len(outs[i]) >= max_tokens:
                    finish(s, "length")

        while True:
            if should_stop is not None and should_stop():
                break
            # Admit queued prompts into free slots (growing the cache or shrinking the slot count
            # within the memory budget when the next prompt needs more room).
            admitted: list[int] = []
            busy, waiting = sum(r >= 0 for r in slot_req), len(queue) - qpos
            hold = (self.admit_min > 1 and busy and waiting
                    and S - busy < max(1, min(self.admit_min, waiting, S // 4)))
            while qpos < len(queue) and not hold:
                i = queue[qpos]
                busy = sum(r >= 0 for r in slot_req)
                want_cap = max(cap, need(i))
                want_s = max(1, min(batch_size, self.budget_tokens // want_cap))
                if busy >= want_s:
                    break
                if want_cap > cap:  # grow with headroom: the queue is sorted, longer prompts follow
                    roomy = max(want_cap, -(-int(cap * 1.25) // 32) * 32)
                    if min(batch_size, self.budget_tokens // roomy) >= want_s:
                        want_cap = roomy
                if want_cap > cap or want_s != S:
                    reshape(want_s, want_cap)
                s = slot_req.index(-1)
                slot_req[s] = i
                outs[i] = []
                admitted.append(s)
                qpos += 1
            if admitted:
                # Prefill in groups of similar length (the queue is sorted) and bounded size.
                for c in range(0, len(admitted), 16):
                    grp = admitted[c:c + 16]
                    logits = self.prefill(k_cache, v_cache, grp, [prompts[slot_req[s]] for s in grp], prefix)
                    toks = pick(logits)
                    for s, t in zip(grp, toks.tolist()):
                        lens[s] = len(prompts[slot_req[s]])
                        last[s] = t
                    accept(grp, toks.tolist())
                continue  # admit more if prefill finished some at once
            busy_slots = [s for s in range(S) if slot_req[s] >= 0]
            if not busy_slots:
                break
            if qpos >= len(queue) and S > 4 and len(busy_slots) <= S // 2:
                reshape(len(busy_slots), cap)  # queue drained: stop computing idle slots
                busy_slots = list(range(S))
            logits = self.decode(k_cache, v_cache, last, lens)
            toks = pick(logits)
            lens += torch.tensor([1 if r >= 0 else 0 for r in slot_req], device=self.device)
            last = toks
            tl = toks.tolist()
            accept(busy_slots, [tl[s] for s in busy_slots])
        return results


def _rotate(x, cos, sin):
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _top_p_filter(logits, top_p: float):
    """HF's TopPLogitsWarper: drop the tokens outside the smallest set with probability mass >= top_p."""
    import torch

    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))


class LocalGenerator:
    def __init__(self, model: str = "default", device: str = "auto", batch_size: int = 8, seed: int = 0,
                 decoder: str = "auto", kv_budget_mb: float = 3072, linear_kernel: str = "auto"):
        """`decoder`: auto (fast when the architecture allows, else hf), fast, or hf. `linear_kernel`: auto
        (oneDNN prepacked matmuls for an fp32 CPU run, bf16 where the CPU has native bf16 matmuls, else fp32,
        as `evaluate` uses), native, onednn-bf16 or onednn-fp32; `self.linear_kernel` says which runs."""
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
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
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
        why_not = fast_decoder_supported(self.model.config)
        if decoder == "fast" and why_not:
            raise ValueError(f"{model}: the fast decoder does not support {why_not}; use decoder='hf'")
        if decoder not in ("auto", "fast", "hf"):
            raise ValueError(f"decoder must be auto, fast or hf, not {decoder!r}")
        self.decoder = "hf" if decoder == "hf" or why_not else "fast"
        from ..cpu_kernels import pack_linears, resolve_linear_kernel

        self.linear_kernel = resolve_linear_kernel(linear_kernel, self.device, dtype)
        if self.decoder == "fast":
            self._fast = _FastDecoder(self.model, kv_budget_mb, self.linear_kernel)
        else:
            self._fast = None
            if self.linear_kernel != "native":
                pack_linears(self.model, self.linear_kernel)

    def render(self, messages: list[dict], disable_thinking: bool = False) -> list[int]:
        kw = {"enable_thinking": False} if disable_thinking else {}
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: list[list[dict]], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, disable_thinking: bool = False,
                 should_stop=None, on_reply=None) -> list[LocalReply]:
        """One reply per conversation, in input order. `should_stop()` is polled between decode steps
        (fast decoder) or batches (hf); when it returns True the unfinished replies are None.
        `on_reply(index, reply)` is called as each reply is done (out of order), so a caller can write it
        at once instead of after the whole call."""
        prompts = [self.render(m, disable_thinking) for m in conversations]
        return self.generate_ids(prompts, max_tokens, temperature, top_p, stop, should_stop, on_reply)

    def generate_ids(self, prompts: list[list[int]], max_tokens: int = 256, temperature: float = 0.0,
                     top_p: float = 1.0, stop: list[str] | None = None, should_stop=None,
                     on_reply=None) -> list[LocalReply]:
        """`generate` for prompts already rendered to token ids."""
        replies: list[LocalReply | None] = [None] * len(prompts)

        def done(i: int, r) -> None:
            toks, finish = r
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            for s in stop or []:
                j = text.find(s)
                if j >= 0:
                    text, finish = text[:j], "stop"
            replies[i] = LocalReply(content=text, finish_reason=finish, prompt_tokens=len(prompts[i]),
                                    completion_tokens=len(toks), token_ids=[int(t) for t in toks])
            if on_reply is not None:
                on_reply(i, replies[i])

        if self.decoder == "fast":
            raw = self._generate_fast(prompts, max_tokens, temperature, top_p, should_stop, done)
        else:
            raw = self._generate_hf(prompts, max_tokens, temperature, top_p, should_stop, done)
        for i, r in enumerate(raw):  # results a decoder returned without reporting them (max_tokens 0)
            if r is not None and replies[i] is None:
                done(i, r)
        return replies

    def _pick(self, temperature: float, top_p: float):
        import torch

        if temperature <= 0:
            return lambda logits: logits.argmax(dim=-1)

        def sample(logits):
            scores = logits.float() / temperature
            if top_p < 1.0:
                scores = _top_p_filter(scores, top_p)
            return torch.multinomial(scores.softmax(dim=-1), 1, generator=self.rng).squeeze(1)

        return sample

    def _generate_fast(self, prompts, max_tokens, temperature, top_p, should_stop, done):
        import torch

        with torch.inference_mode():
            return self._fast.run(prompts, max_tokens, self.eos_ids, self.batch_size,
                                  self._pick(temperature, top_p), should_stop, on_done=done)

    def _generate_hf(self, prompts, max_tokens, temperature, top_p, should_stop, done):
        """HF `generate` in left-padded batches of `batch_size`, prompts sorted by length."""
        import torch

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out_rows: list = [None] * len(prompts)
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
            kw = {"max_new_tokens": max_tokens, "pad_token_id": self.pad_id, "eos_token_id": self.eos_ids}
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
                out_rows[i] = (toks, finish)
                done(i, out_rows[i])
        return out_rows
