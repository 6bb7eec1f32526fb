"""Core metrics of a pruned model against its dense base.

- ``kl_to_dense``: mean per-token KL(dense || pruned), both given the same system prompt,
  teacher-forced on the dense model's greedy answers to the eval questions;
- ``nll``: the pruned model's mean per-token negative log-likelihood of those answers
  (``nll_dense`` is the dense model's own, for reference).

Measure them with the persona as the system prompt (persona questions) and without one
(general questions). A pruned model is given either as 0/1 channel masks applied to the
dense model (cheap, identical to the exported checkpoint) or as a separate model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pruning import PruneError
from pruning.chat import pad_id_of
from pruning.generate.hf import generate_detailed
from pruning.prefix_forward import (channel_mask, forward_suffixes, kept_masks, length_batches, logp_at,
                                    make_examples, prefix_kv, scored_positions, shared_prompt_len)


@dataclass
class EvalSet:
    name: str
    system: str | None
    questions: list[str]
    persona: str | None = None
    eval_prompt: str | None = None


def _as_text(x) -> str | None:
    if isinstance(x, str):
        return x.strip() or None
    if isinstance(x, dict):
        for key in ("pos", "content", "text", "system_prompt", "instruction"):
            if isinstance(x.get(key), str) and x[key].strip():
                return x[key].strip()
    if isinstance(x, list):
        for item in x:
            t = _as_text(item)
            if t:
                return t
    return None


def load_eval_file(path: str | Path, *, with_persona: bool = True, limit: int | None = None) -> EvalSet:
    """An eval JSON: `questions` plus `system_prompt` / `instruction` / `persona_description`.

    `with_persona=False` keeps the questions and drops the system prompt (general use).
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PruneError(f"cannot read eval file {p}: {e}") from None
    if isinstance(d, list):
        d = {"questions": d}
    qs = []
    for q in d.get("questions") or d.get("prompts") or []:
        t = _as_text(q) if not isinstance(q, dict) else (q.get("question") or q.get("instruction") or _as_text(q))
        if t:
            qs.append(t.strip())
    if not qs:
        raise PruneError(f"{p}: no questions")
    persona = _as_text(d.get("persona_description") or d.get("persona"))
    system = _as_text(d.get("system_prompt")) or _as_text(d.get("instruction")) or persona
    prompt = d.get("eval_prompt") if isinstance(d.get("eval_prompt"), str) else None
    return EvalSet(p.stem, system if with_persona else None, qs[:limit] if limit else qs, persona, prompt)


class Evaluator:
    """Dense greedy answers and dense log-probs for one (system, questions) set, computed once;
    then `score(masks)` / `score(model=...)` gives the metrics of any pruned variant."""

    def __init__(self, dense_model, tok, system: str | None, questions: list[str], *, max_new_tokens: int = 96,
                 answers: list[str] | None = None, finished: list[bool] | None = None, batch_size: int = 8,
                 gen_batch_size: int = 16, examples: list | None = None):
        self.tok, self.system, self.batch_size = tok, system, batch_size
        self.model = dense_model
        if examples is None and answers is None:
            pairs = generate_detailed(dense_model, tok, system, questions, max_new_tokens, batch_size=gen_batch_size)
            answers, finished = [a for a, _ in pairs], [f for _, f in pairs]
        self.questions, self.answers, self.finished = questions, answers, finished
        self.examples = examples if examples is not None else make_examples(tok, system, questions, answers,
                                                                            finished, max_length=1024)
        if not self.examples:
            raise PruneError("nothing to evaluate: the dense model gave no answers")
        self.P = shared_prompt_len(self.examples)
        self.batches = length_batches([len(e.ids) for e in self.examples], batch_size)
        self.dense_logp: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        for lp, tgt in self._logps(dense_model, None):
            self.dense_logp.append(lp)
            self.targets.append(tgt)
        n = sum(len(t) for t in self.targets)
        self.dense_nll = float(sum(F.nll_loss(lp, t, reduction="sum") for lp, t in zip(self.dense_logp, self.targets)) / n)
        self.tokens = n

    @torch.no_grad()
    def _logps(self, model, masks):
        pad = pad_id_of(self.tok)
        with channel_mask(model, masks):
            kv = prefix_kv(model, self.examples[0].ids[: self.P]) if self.P > 0 else None
            for idx in self.batches:
                sfx = [self.examples[i].ids[self.P:] for i in idx]
                hidden = forward_suffixes(model, kv, self.P, sfx, pad)
                rows, cols, tgt = scored_positions(self.examples, idx, self.P)
                yield logp_at(model, hidden, rows, cols).cpu(), tgt

    def score(self, masks: list[torch.Tensor] | None = None, *, model=None, kept=None) -> dict:
        """Metrics of the dense model under 0/1 `masks` (or `kept` indices), or of another `model`."""
        m = model if model is not None else self.model
        if kept is not None:
            masks = kept_masks(self.model, kept)
        kl_sum, nll_sum = 0.0, 0.0
        per_ex = torch.zeros(len(self.examples), dtype=torch.float64)
        for b, (lq, tgt) in enumerate(self._logps(m, masks)):
            lp = self.dense_logp[b]
            kl_tok = (lp.exp() * (lp - lq)).sum(-1)
            kl_sum += float(kl_tok.sum())
            nll_sum += float(F.nll_loss(lq, tgt, reduction="sum"))
            idx = self.batches[b]
            n = [len(self.examples[i].ids) - self.examples[i].n_prompt for i in idx]
            for i, part in zip(idx, torch.split(kl_tok, n)):
                per_ex[i] = float(part.mean())
        self.last_per_example = per_ex.tolist()
        return {"kl_to_dense": kl_sum / self.tokens, "nll": nll_sum / self.tokens, "nll_dense": self.dense_nll,
                "tokens": self.tokens}
