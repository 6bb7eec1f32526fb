"""The dense model's passes over teacher-forced examples, for mask learning and its baselines.

`dense_pass`: the KL targets (the dense distribution at every scored token, top-K log-probs plus
one tail bucket) and the per-channel activation norms, optionally with the empirical Fisher of
the channel mask from the same forward; `fisher_diag`: the Fisher alone (or on sampled tokens);
`masked_losses`: CE / KL of the model under fixed masks against those targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pruning.chat import pad_id_of
from pruning.model_io import ffn_blocks
from pruning.prefix_forward import (Example, channel_mask, forward_suffixes, length_batches, logp_at, prefix_kv,
                                    scored_positions, shared_prompt_len)


@dataclass
class DenseTargets:
    """Per batch: positions and the dense top-K log-probs (+ tail) at each scored token."""

    batches: list[list[int]]
    pos: list[tuple]
    top_idx: list[torch.Tensor]
    top_logp: list[torch.Tensor]
    tail_logp: list[torch.Tensor]


@torch.no_grad()
def dense_pass(model, tok, examples: list[Example], P: int, batch_size: int, kl_topk: int,
               act: bool = True, progress: Callable[[float], None] = lambda f: None, fisher: bool = False):
    """One pass of the unmasked model: KL targets and per-channel activation norms
    (`kl_topk=0`: the norms alone; the targets' batches stay empty). With `fisher` the same
    forward also gives `fisher_diag`'s empirical Fisher (answer tokens, shared prefix), returned
    third: one forward and backward instead of a forward and then a forward and backward."""
    blocks = ffn_blocks(model)
    C = blocks[0].down_proj.in_features
    sq = [torch.zeros(b.down_proj.in_features, dtype=torch.float64) for b in blocks]
    fish = torch.zeros(len(blocks), C, dtype=torch.float64) if fisher else None
    state = {"mask": None}

    def hook(_m, args, i):
        a = args[0].detach()
        if state["mask"] is not None:  # only real (non-pad) tokens
            a = a[state["mask"].to(a.device)]
        a = a.reshape(-1, a.shape[-1]).double()
        sq[i] += (a * a).sum(0).cpu()

    handles = [b.down_proj.register_forward_pre_hook(lambda m, a, i=i: hook(m, a, i)) for i, b in enumerate(blocks)]
    pad = pad_id_of(tok)
    try:
        kv = prefix_kv(model, examples[0].ids[:P]) if P > 0 else None
        for s in sq:  # the prefix is seen once per example
            s.mul_(len(examples))
        batches = length_batches([len(e.ids) for e in examples], batch_size)
        t = DenseTargets(batches, [], [], [], [])
        for n, idx in enumerate(batches):
            sfx = [examples[i].ids[P:] for i in idx]
            T = max(len(x) for x in sfx)
            state["mask"] = torch.tensor([[c < len(x) for c in range(T)] for x in sfx])
            rows, cols, tgt = scored_positions(examples, idx, P)
            if fish is not None:
                g2, logp = _fisher_batch(model, kv, P, sfx, pad, rows, cols, tgt)
                state["mask"] = None
                fish += g2
            else:
                hidden = forward_suffixes(model, kv, P, sfx, pad)
                state["mask"] = None
                logp = logp_at(model, hidden, rows, cols) if kl_topk else None
            progress((n + 1) / len(batches))
            if not kl_topk:
                continue
            top = torch.topk(logp, kl_topk, dim=-1)
            tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
            t.pos.append((rows, cols, tgt))
            t.top_idx.append(top.indices)
            t.top_logp.append(top.values)
            t.tail_logp.append(tail)
    finally:
        for h in handles:
            h.remove()
    norms = [s.sqrt().float() for s in sq]
    if fish is not None:
        return t, norms, list(fish.float())
    return t, norms


def _fisher_batch(model, kv, P: int, sfx: list[list[int]], pad: int, rows, cols, tgt):
    """One batch's Fisher terms: the squared gradient of each example's mean CE on `tgt` with
    respect to an all-ones channel mask, summed over the batch ((L, C) float64), and the
    unmasked model's log-probs at the scored positions (detached)."""
    blocks = ffn_blocks(model)
    m = torch.ones(len(blocks), len(sfx), 1, blocks[0].down_proj.in_features, requires_grad=True)
    with torch.enable_grad(), channel_mask(model, lambda i: m[i]):
        logq = logp_at(model, forward_suffixes(model, kv, P, sfx, pad), rows, cols)
        ce = F.nll_loss(logq, tgt.to(logq.device), reduction="none")
        per_ex = torch.zeros(len(sfx)).index_add(0, rows, ce.float().cpu())
        counts = torch.bincount(rows, minlength=len(sfx)).clamp_min(1)
        (per_ex / counts).sum().backward()
    return (m.grad[:, :, 0, :].double() ** 2).sum(1), logq.detach()


def _buckets(logq: torch.Tensor, top_idx) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked model's log-probs of the dense top-K tokens, and of all the others as one bucket."""
    q_top = logq.gather(-1, top_idx)
    return q_top, torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-6))


def topk_kl(logq: torch.Tensor, top_idx, top_logp, tail_logp) -> torch.Tensor:
    """Per-token KL(p || q) over the K dense-top tokens plus one bucket for the rest."""
    q_top, q_tail = _buckets(logq, top_idx)
    p_top = top_logp.exp()
    kl = (p_top * (top_logp - q_top)).sum(-1) + tail_logp.exp() * (tail_logp - q_tail)
    return kl


def topk_rkl(logq: torch.Tensor, top_idx, top_logp, tail_logp) -> torch.Tensor:
    """Per-token reverse KL(q || p) over the same K tokens plus tail bucket: mode-seeking, it
    penalises the masked model for mass where the dense model has little (what greedy decoding picks)."""
    q_top, q_tail = _buckets(logq, top_idx)
    return (q_top.exp() * (q_top - top_logp)).sum(-1) + q_tail.exp() * (q_tail - tail_logp)


@torch.no_grad()
def masked_losses(model, tok, examples: list[Example], masks: list[torch.Tensor] | None, P: int | None = None,
                  batch_size: int = 8, dense: DenseTargets | None = None) -> dict:
    """Token-mean CE (and KL to `dense`, when given) of the model under fixed 0/1 masks."""
    if P is None:
        P = shared_prompt_len(examples)
    pad = pad_id_of(tok)
    ce_sum, kl_sum, n = 0.0, 0.0, 0
    with channel_mask(model, masks):
        kv = prefix_kv(model, examples[0].ids[:P]) if P > 0 else None
        batches = dense.batches if dense is not None else length_batches([len(e.ids) for e in examples], batch_size)
        for b, idx in enumerate(batches):
            sfx = [examples[i].ids[P:] for i in idx]
            hidden = forward_suffixes(model, kv, P, sfx, pad)
            rows, cols, tgt = scored_positions(examples, idx, P)
            logq = logp_at(model, hidden, rows, cols)
            ce_sum += float(F.nll_loss(logq, tgt.to(logq.device), reduction="sum"))
            if dense is not None:
                kl_sum += float(topk_kl(logq, dense.top_idx[b], dense.top_logp[b], dense.tail_logp[b]).sum())
            n += len(tgt)
    out = {"ce": ce_sum / max(n, 1), "tokens": n}
    if dense is not None:
        out["kl"] = kl_sum / max(n, 1)
    return out


def fisher_diag(model, tok, examples: list[Example], P: int, batch_size: int, *,
                dense: DenseTargets | None = None, sampled: bool = False,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per-channel Fisher of the mask at 1: sum over examples of (d CE_e / d m_j)^2.

    CE on the answer tokens (empirical Fisher), or with ``sampled`` on tokens drawn from the
    dense model's own (top-K) distribution at each position (closer to the true Fisher).
    """
    blocks = ffn_blocks(model)
    C = blocks[0].down_proj.in_features
    fisher = torch.zeros(len(blocks), C, dtype=torch.float64)
    pad = pad_id_of(tok)
    kv = prefix_kv(model, examples[0].ids[:P]) if P > 0 else None
    batches = dense.batches if dense is not None else length_batches([len(e.ids) for e in examples], batch_size)
    for b, idx in enumerate(batches):
        rows, cols, tgt = scored_positions(examples, idx, P)
        if sampled and dense is not None:
            pick = torch.multinomial(dense.top_logp[b].float().exp(), 1, generator=generator)[:, 0]
            tgt = dense.top_idx[b].gather(1, pick[:, None])[:, 0]
        fisher += _fisher_batch(model, kv, P, [examples[i].ids[P:] for i in idx], pad, rows, cols, tgt)[0]
    return list(fisher.float())
