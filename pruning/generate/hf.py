"""Batched greedy (or sampled) chat generation with transformers, the shared prefix run once."""

from __future__ import annotations

from typing import Callable

import torch

from pruning.chat import chat_ids, end_of_turn_id, pad_id_of, prompt_ids
from pruning.model_io import model_device
from pruning.prefix_forward import common_prefix_len, expanded_cache, prefix_kv


@torch.no_grad()
def generate_detailed(model, tok, system: str | None, questions: list[str], max_new_tokens: int = 96, *,
                      batch_size: int = 16, temperature: float = 0.0, seed: int = 0,
                      progress: Callable[[float], None] = lambda f: None) -> list[tuple[str, bool]]:
    """(answer, finished) per question; finished = ended with end-of-turn within the budget.

    Rows are grouped by prompt length; the shared system prefix is run once and its KV cache
    reused (left padding sits between the prefix and each question; the attention mask and
    mask-derived position ids keep every row exact). The persona prompt is never cut: a long
    one is what a persona-conditioned answer depends on.
    """
    seqs = [prompt_ids(tok, q, system) for q in questions]
    return generate_ids(model, tok, seqs, max_new_tokens, batch_size=batch_size, temperature=temperature,
                        seed=seed, progress=progress)


def chat_generate(model, tok, conversations: list[list[dict]], max_new_tokens: int,
                  batch_size: int = 8) -> list[tuple[str, bool]]:
    """Greedy next assistant turn per conversation."""
    return generate_ids(model, tok, [chat_ids(tok, c) for c in conversations], max_new_tokens,
                        batch_size=batch_size)


@torch.no_grad()
def generate_ids(model, tok, seqs: list[list[int]], max_new_tokens: int, *, batch_size: int = 16,
                 temperature: float = 0.0, seed: int = 0,
                 progress: Callable[[float], None] = lambda f: None) -> list[tuple[str, bool]]:
    """(text, finished) continuing each tokenised prompt (a chat ending in the assistant header)."""
    if not seqs:
        return []
    dev = model_device(model)
    pad, eot = pad_id_of(tok), end_of_turn_id(tok)
    P = common_prefix_len(seqs, limit=min(len(s) for s in seqs) - 1)
    kv = prefix_kv(model, seqs[0][:P]) if P > 0 else None
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    results: list[tuple[str, bool] | None] = [None] * len(seqs)
    gen_kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=pad)
    if temperature and temperature > 0:
        gen_kw.update(do_sample=True, temperature=float(temperature), top_p=1.0, top_k=0)
    else:
        gen_kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for n, idx in enumerate(batches):
        sfx = [seqs[i][P:] for i in idx]
        T = max(len(s) for s in sfx)
        ids = torch.full((len(idx), P + T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), P + T), dtype=torch.long)
        ids[:, :P] = torch.tensor(seqs[idx[0]][:P])
        mask[:, :P] = 1
        for r, s in enumerate(sfx):
            ids[r, P + T - len(s):] = torch.tensor(s)
            mask[r, P + T - len(s):] = 1
        if gen_kw["do_sample"]:
            torch.manual_seed(seed * 1000003 + n)
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             past_key_values=expanded_cache(model, kv, len(idx)), **gen_kw)
        new = out[:, P + T:].cpu()
        for r, i in enumerate(idx):
            toks = new[r].tolist()
            finished = eot in toks
            if finished:
                toks = toks[: toks.index(eot)]
            while toks and toks[-1] == pad:
                toks.pop()
            results[i] = (tok.decode(toks, skip_special_tokens=True).strip(), finished)
        progress((n + 1) / len(batches))
    return results  # type: ignore[return-value]
