"""Batched chat forwards with a shared-prefix KV cache, and channel masks on the FFNs.

Every Persona-Pruner stage runs many chats that share one system prompt. The shared token
prefix is run once (batch 1) and its keys/values are reused by every batch of suffixes
(right padded, explicit position ids), which is exact and, for long persona prompts,
several times cheaper than re-running the prompt for every row. On CPU the suffixes attend to
the prefix through one shared copy of its keys/values (`_split_attention`) instead of a cache
expanded per row.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pruning.chat import answer_ids, prompt_ids
from pruning.model_io import ffn_blocks, model_device


# -- teacher-forced examples -------------------------------------------------


@dataclass
class Example:
    """One teacher-forced chat: `ids` = prompt + answer; the loss covers ids[n_prompt:]."""

    ids: list[int]
    n_prompt: int


def make_examples(tok, system: str | None, questions: list[str], answers: list[str],
                  finished: list[bool] | None = None, max_length: int = 512) -> list[Example]:
    out = []
    for i, (q, a) in enumerate(zip(questions, answers)):
        p = prompt_ids(tok, q, system)
        ans = answer_ids(tok, a, True if finished is None else finished[i])
        # the prompt is never cut (a long persona is the point); a prompt near `max_length`
        # still keeps up to 64 answer tokens to score
        room = max(max_length - len(p), min(len(ans), 64))
        if ans:
            out.append(Example(p + ans[:room], len(p)))
    return out


def common_prefix_len(seqs: list[list[int]], limit: int | None = None) -> int:
    """Length of the longest shared token prefix, capped at `limit`."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    if limit is not None:
        n = min(n, limit)
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def shared_prompt_len(examples: list[Example]) -> int:
    """Tokens every example's prompt shares (the system prompt, usually), leaving each at least one
    prompt token of its own: the prefix that is run once and reused as a KV cache."""
    return common_prefix_len([e.ids for e in examples], limit=min(e.n_prompt for e in examples) - 1)


def scored_positions(examples: list[Example], idx: list[int], P: int):
    """Rows/cols (suffix coordinates) whose outputs predict the scored tokens, and the targets."""
    rows, cols, tgt = [], [], []
    for r, i in enumerate(idx):
        e = examples[i]
        for t in range(e.n_prompt, len(e.ids)):
            rows.append(r)
            cols.append(t - 1 - P)
            tgt.append(e.ids[t])
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(tgt)


def logp_at(model, hidden, rows, cols) -> torch.Tensor:
    """Log-probabilities (float32) of the next token at the given (row, col) positions of `hidden`."""
    h = hidden[rows.to(hidden.device), cols.to(hidden.device)]
    return F.log_softmax(model.lm_head(h).float(), dim=-1)


# -- shared-prefix forwards ---------------------------------------------------


def prefix_kv(model, ids: list[int], *, grad: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Keys/values of every layer for one token prefix (batch 1); detached unless `grad`
    (then gradients reach whatever the prefix's forward depends on, e.g. a live channel mask)."""
    if not ids:
        return None
    dev = model_device(model)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        out = model.model(input_ids=torch.tensor([ids], device=dev), use_cache=True)
    kv = []
    for layer in out.past_key_values.layers:
        kv.append((layer.keys, layer.values) if grad else (layer.keys.detach(), layer.values.detach()))
    return kv


def expanded_cache(model, kv, batch: int):
    """A KV cache of `batch` rows that all continue the prefix `kv` (views, no copies); layers whose
    keys are None (a forward stopped early) stay empty."""
    from transformers import DynamicCache

    if kv is None:
        return None
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) if k is not None else (None, None)
            for k, v in kv]
    return DynamicCache(ddp_cache_data=data, config=model.config)


def suffix_inputs(suffixes: list[list[int]], prefix_len: int, pad_id: int, device):
    """Right-padded suffix ids, the full (prefix + suffix) attention mask, and position ids."""
    B, T = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, prefix_len + T), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for i, s in enumerate(suffixes):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, prefix_len: prefix_len + len(s)] = 1
    pos = (torch.arange(T) + prefix_len).unsqueeze(0).expand(B, -1)
    return ids.to(device), mask.to(device), pos.to(device)


def forward_suffixes(model, kv, prefix_len: int, suffixes: list[list[int]], pad_id: int):
    """Final hidden states (B, T, H) of right-padded suffixes that continue a shared prefix.

    Outputs at pad positions are not meaningful (callers read real tokens only)."""
    dev = model_device(model)
    ids, mask, pos = suffix_inputs(suffixes, prefix_len, pad_id, dev)
    if kv is not None and _split_attention_fits(model):
        return _forward_split(model, kv, ids, pos)
    cache = expanded_cache(model, kv, len(suffixes))
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                      use_cache=cache is not None)
    return out.last_hidden_state


# The suffixes' attention split in two: over the shared prefix and over themselves. On CPU the
# cache path attends every row to its own expanded copy of the prefix and its backward computes
# key/value gradients for all of it; here one matmul per KV head serves the whole batch and the
# (detached) prefix gets no gradient work. Exact up to rounding; behind a 1,000-token persona
# prompt a learning step costs about a fifth less, the dense pass a third (docs/quality_experiments.md).
_SPLIT = "npc_shared_prefix"
_PREFIX_KV: contextvars.ContextVar = contextvars.ContextVar("npc_prefix_kv", default=None)
# decoder-only families whose attention is plain causal softmax attention (no window, no softcap)
_SPLIT_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def _split_attention_fits(model) -> bool:
    cfg = model.config
    if model_device(model).type != "cpu" or cfg.model_type not in _SPLIT_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    return cfg._attn_implementation in ("sdpa", "eager")


def _forward_split(model, kv, ids, pos):
    from transformers import AttentionInterface

    if _SPLIT not in AttentionInterface._global_mapping:
        AttentionInterface.register(_SPLIT, _split_attention)
    token = _PREFIX_KV.set(kv)
    impl = model.config._attn_implementation
    model.config._attn_implementation = _SPLIT  # read per forward; no mask is built for it
    try:
        return model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    finally:
        model.config._attn_implementation = impl
        _PREFIX_KV.reset(token)


def _split_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention of suffix queries over [prefix | causal suffix]; the prefix keys/values
    (batch 1) come from `_PREFIX_KV`. Right padding needs no mask: a real token never sees a
    later position. The products run in float32, as inside the SDPA kernel: with bf16 products
    the mask gradient's error against an fp32 reference was up to 1.7x the kernel's on one
    batch (docs/quality_experiments.md)."""
    kp, vp = _PREFIX_KV.get()[module.layer_idx]
    dt = query.dtype
    query, key, value, kp, vp = (x.float() for x in (query, key, value, kp, vp))
    B, H, T, d = query.shape
    G, P = kp.shape[1], kp.shape[2]  # KV heads, prefix length
    g = H // G
    # KV-head-major layout (G, B, g*T, d); the scale goes on the queries, the smallest tensor
    q = (query * scaling).reshape(B, G, g * T, d).transpose(0, 1).contiguous()
    s_pre = torch.bmm(q.view(G, B * g * T, d), kp[0].transpose(1, 2)).view(G, B, g * T, P)
    s_suf = torch.matmul(q, key.transpose(0, 1).transpose(2, 3))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1).repeat(g, 1)
    p = torch.softmax(torch.cat([s_pre, s_suf.masked_fill(future, float("-inf"))], -1), dim=-1)
    out = torch.bmm(p[..., :P].view(G, B * g * T, P), vp[0]).view(G, B, g * T, d)
    out = out + torch.matmul(p[..., P:], value.transpose(0, 1))
    return out.view(G, B, g, T, d).permute(1, 3, 0, 2, 4).reshape(B, T, H, d).to(dt), None


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), order deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


# -- channel masks on FFN intermediates ----------------------------------------


@contextmanager
def channel_mask(model, masks):
    """Multiply each FFN's intermediate activation (down_proj input) by a per-channel mask.

    `masks` is a list (one per layer) of (C,) tensors, or a callable layer -> tensor that is
    evaluated on every forward (so masks that depend on trainable scores stay live), or None
    (the dense model: nothing is hooked).
    """
    if masks is None:
        yield
        return
    blocks = ffn_blocks(model)
    get = masks if callable(masks) else (lambda i: masks[i])
    hooks = []
    for i, b in enumerate(blocks):
        def pre(_m, args, i=i):
            m = get(i)
            if m is None:
                return None
            x = args[0]
            return (x * m.to(dtype=x.dtype, device=x.device),) + tuple(args[1:])

        hooks.append(b.down_proj.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def kept_masks(model, kept: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for b, idx in zip(ffn_blocks(model), kept):
        m = torch.zeros(b.down_proj.in_features)
        m[idx] = 1.0
        out.append(m)
    return out
