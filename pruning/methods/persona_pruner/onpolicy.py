"""On-policy examples: the masked model's own greedy answers to training prompts.

The KL loss is teacher-forced on the teacher's text, so it trains the pruned model only where
the dense model's answer goes. A player reads the pruned model's own answers, and once its
first few tokens differ it is in contexts no example covered: there it loops or loses the
persona (docs/quality_experiments.md: the shipped masks keep 0.98 of the persona's preference
on the dense text, 0.63 on their own). Scoring the model's own answers with the dense model's
distribution (the same KL, now on the student's text) trains exactly those contexts.
"""

from __future__ import annotations

import torch

from pruning.chat import answer_ids
from pruning.generate.hf import generate_ids
from pruning.prefix_forward import Example, channel_mask


def own_examples(model, tok, examples: list[Example], masks: list[torch.Tensor], n: int, max_new_tokens: int,
                 seed: int, batch_size: int = 16) -> list[Example]:
    """`n` of the examples' prompts (drawn with `seed`), each with the model's greedy answer under
    `masks` (per layer, what the exported model multiplies its FFN channels by)."""
    g = torch.Generator().manual_seed(seed + 1)
    pick = sorted(torch.randperm(len(examples), generator=g)[: min(n, len(examples))].tolist())
    prompts = [examples[i].ids[: examples[i].n_prompt] for i in pick]
    with torch.no_grad(), channel_mask(model, masks):
        pairs = generate_ids(model, tok, prompts, max_new_tokens, batch_size=batch_size)
    out = []
    for p, (text, finished) in zip(prompts, pairs):
        ans = answer_ids(tok, text, finished)
        if ans:
            out.append(Example(p + ans, len(p)))
    return out
