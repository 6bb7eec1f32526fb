"""Token weights that say where the persona shows: the dense model's PMI of each answer token.

The judge measure (`pruning.eval.persona`) asks how much better the persona's own prompt explains
an answer than other personas' prompts do. A plain KL to the dense model spends the mask's budget
on every token alike, and most answer tokens ("the", "is", punctuation) would be the same under
any persona. So with ``persona_weight`` = a > 0 each scored token t gets the weight

    w_t = (1 + a * r_t / mean(r)) / (1 + a),   r_t = clip(log p(t | sys_u) - mean_v log p(t | sys_v), 0, q95)

from the dense model teacher-forced on the same answers under the persona's prompt (u) and under
`contrast_references` reference personas' prompts in the same template (v). The weights average
~1, so the loss keeps its scale. The reference personas are taken from the *end* of the list
while the quality benchmark's judge uses the first ones: the weights are not fitted to the judge.
"""

from __future__ import annotations

import torch

from pruning import PruneError
from pruning.chat import pad_id_of, prompt_ids
from pruning.eval.persona import persona_prompts
from pruning.prefix_forward import (Example, forward_suffixes, logp_at, prefix_kv, scored_positions,
                                    shared_prompt_len)

PROBE = "Hello."


def _head_len(a: list[int], b: list[int]) -> int:
    """Length of `a` before the tail it shares with `b`."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return len(a) - n


def reswap_system(tok, examples: list[Example], system: str, other: str) -> list[Example]:
    """The same examples (questions and answer tokens) with `other` as the system prompt."""
    pu, pv = prompt_ids(tok, PROBE, system), prompt_ids(tok, PROBE, other)
    hu, hv = _head_len(pu, pv), _head_len(pv, pu)
    head_u, head_v = pu[:hu], pv[:hv]
    out = []
    for e in examples:
        if e.ids[:hu] != head_u:
            raise PruneError("the examples do not start with the persona's system prompt")
        out.append(Example(head_v + e.ids[hu:], e.n_prompt - hu + hv))
    return out


def contrast_systems(system: str, persona: str | None, references: list[str], n: int) -> list[str]:
    """The last `n` reference personas in the target's template (the judge takes the first ones)."""
    _, refs = persona_prompts(system, persona, references)
    return refs[-n:] if n > 0 else []


@torch.no_grad()
def answer_logps(model, tok, examples: list[Example], batches: list[list[int]]) -> list[torch.Tensor]:
    """Per batch: the log-prob of each scored answer token (scored_positions order)."""
    P = shared_prompt_len(examples)
    pad = pad_id_of(tok)
    kv = prefix_kv(model, examples[0].ids[:P]) if P > 0 else None
    out = []
    for idx in batches:
        hidden = forward_suffixes(model, kv, P, [examples[i].ids[P:] for i in idx], pad)
        rows, cols, tgt = scored_positions(examples, idx, P)
        lp = logp_at(model, hidden, rows, cols)
        out.append(lp.gather(1, tgt.to(lp.device)[:, None])[:, 0].float().cpu())
    return out


def persona_token_weights(model, tok, examples: list[Example], batches: list[list[int]], system: str,
                          contrast: list[str], alpha: float) -> tuple[list[torch.Tensor], dict]:
    """Per batch (the dense targets' `batches`): each scored token's weight (mean ~1), and a
    summary for the manifest."""
    if not contrast:
        raise PruneError("persona_weight needs at least one reference persona other than the target")
    own = answer_logps(model, tok, examples, batches)
    refs = [answer_logps(model, tok, reswap_system(tok, examples, system, s), batches) for s in contrast]
    pmi = [o - torch.stack([r[b] for r in refs]).mean(0) for b, o in enumerate(own)]
    # a few tokens (a name after its first piece) reach PMIs of several nats: capped at the 95th
    # percentile so that they do not take the whole loss
    cap = float(torch.quantile(torch.cat(pmi).clamp_min(0), 0.95))
    r = [p.clamp(0, cap) for p in pmi]
    scale = float(torch.cat(r).mean()) or 1.0
    weights = [(1 + alpha * x / scale) / (1 + alpha) for x in r]
    allp = torch.cat(pmi)
    w = torch.cat(weights)
    return weights, {"persona_weight": alpha, "contrast_references": len(contrast),
                     "token_pmi_mean": round(float(allp.mean()), 4),
                     "token_pmi_positive": round(float((allp > 0).float().mean()), 4),
                     "weight_max": round(float(w.max()), 3)}
