"""Mask learning: one real score per FFN channel, trained through a hard top-k mask.

The model's weights stay frozen. Every FFN's intermediate activation (the input of
down_proj) is multiplied by a per-layer mask derived from the scores:

- ``ste``       forward: the hard top-k mask (exactly what export keeps); backward: the
                straight-through estimator, d mask / d score = 1 (``ste_grad="identity"``)
                or the slope of sigmoid((s - t_l) / T) around the layer's threshold t_l
                (``ste_grad="sigmoid"``).
- ``gumbel``    binary Gumbel-softmax (logistic noise on the scores, temperature T),
                hard top-k of the noisy scores forward, straight-through backward.
- ``soft-topk`` forward sigmoid((s - t_l) / T) with t_l between the k-th and (k+1)-th score
                (a relaxed mask; only the final top-k is exported).

With ``scale_steps`` the mask is then fixed and a real scale per kept channel (init 1) is learned
on the same loss for that many steps: removing a quarter of a layer's channels also removes part
of what the FFN adds to the residual stream, which no choice of channels restores. Export folds
the scales into down_proj's columns, so the checkpoint keeps its standard pruned shape.

Loss on the assistant tokens of (system=persona, user=instruction, assistant=answer)
examples: ce_weight * cross-entropy + kl_weight * KL(dense-with-persona || masked) (+ rkl_weight *
the reverse KL(masked || dense), off by default). The dense
distributions are computed once (no grad) and kept as top-K log-probs plus one tail bucket.
Scores start from the activation importance measured on the same examples, normalised per
layer (z-score of the log), and only the scores are optimised (Adam). The shared system
prompt is re-encoded under the current hard mask (no grad) every step and its KV cache
reused by the batch: the forward is exact; the gradient ignores the path through the
prefix's keys/values.

The settings are `pruning.options.MaskLearnConfig` (with the profiles and their bounds); the
dense model's passes (targets, activation norms, Fisher) are in `targets.py`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pruning import PruneError
from pruning.chat import pad_id_of
from pruning.methods.baselines import down_column_norms, weight_magnitudes
from pruning.methods.persona_pruner.targets import (DenseTargets, dense_pass, fisher_diag, masked_losses, topk_kl,
                                                    topk_rkl)
from pruning.methods.persona_pruner.onpolicy import own_examples
from pruning.model_io import ffn_blocks, frozen
from pruning.options import MaskLearnConfig
from pruning.prefix_forward import Example, channel_mask, forward_suffixes, logp_at, prefix_kv, shared_prompt_len


FORBIDDEN = -1e4  # the initial score of a channel the mask may not keep


def _hard_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    """(L, C) 0/1 mask of the k largest per row (ties broken by index, deterministic)."""
    idx = torch.topk(s, k, dim=-1, sorted=False).indices
    return torch.zeros_like(s).scatter_(-1, idx, 1.0)


def _threshold(s: torch.Tensor, k: int) -> torch.Tensor:
    """(L, 1) midpoint between the k-th and (k+1)-th largest score of each row."""
    top = torch.topk(s, min(k + 1, s.shape[-1]), dim=-1).values
    if k >= s.shape[-1]:
        return top[:, -1:] - 1.0
    return 0.5 * (top[:, k - 1: k] + top[:, k: k + 1])


class ChannelScores(torch.nn.Module):
    """(L, C) real scores and the mask each variant derives from them."""

    def __init__(self, init: torch.Tensor, k: int, cfg: MaskLearnConfig):
        super().__init__()
        self.scores = torch.nn.Parameter(init.clone().float())
        self.scale: torch.nn.Parameter | None = None  # set by `fix_mask`: the scale phase
        self.k, self.cfg = k, cfg
        self._current: torch.Tensor | None = None

    def fix_mask(self) -> torch.nn.Parameter:
        """From now on the mask is the current hard top-k and only the per-channel scales learn."""
        if self.scale is None:
            self.scale = torch.nn.Parameter(torch.ones_like(self.scores))
        return self.scale

    def hard(self) -> torch.Tensor:
        return _hard_topk(self.scores.detach(), self.k)

    def effective(self) -> torch.Tensor:
        """The (L, C) multiplier the exported model applies: the hard mask, times the scales."""
        h = self.hard()
        return h if self.scale is None else h * self.scale.detach()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The (L, C) training mask for one step (carries gradient to the scores)."""
        s, cfg, k = self.scores, self.cfg, self.k
        T = max(cfg.temperature, 1e-4)
        if self.scale is not None:  # the scale phase: a fixed mask, no gradient to the scores
            self._current = _hard_topk(s.detach(), k) * self.scale
            return self._current
        if cfg.variant == "ste":
            hard = _hard_topk(s.detach(), k)
            if cfg.ste_grad == "sigmoid":
                soft = torch.sigmoid((s - _threshold(s.detach(), k)) / T)
            else:
                soft = s
            m = hard + (soft - soft.detach())
        elif cfg.variant == "gumbel":
            u = torch.rand(s.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
            noisy = s + (torch.log(u) - torch.log1p(-u)) * T
            hard = _hard_topk(noisy.detach(), k)
            soft = torch.sigmoid((noisy - _threshold(noisy.detach(), k)) / T)
            m = hard + (soft - soft.detach())
        else:  # soft-topk
            m = torch.sigmoid((s - _threshold(s.detach(), k)) / T)
        self._current = m
        return m

    def layer_mask(self, i: int) -> torch.Tensor | None:
        return None if self._current is None else self._current[i]


def _batch_loss(model, hidden, dt: DenseTargets, b: int, cfg: MaskLearnConfig):
    rows, cols, tgt = dt.pos[b]
    logq = logp_at(model, hidden, rows, cols)
    ce = F.nll_loss(logq, tgt.to(logq.device), reduction="none")
    kl = topk_kl(logq, dt.top_idx[b], dt.top_logp[b], dt.tail_logp[b])
    if cfg.rkl_weight:
        return ce, kl, topk_rkl(logq, dt.top_idx[b], dt.top_logp[b], dt.tail_logp[b])
    return ce, kl, None


# -- initial scores ------------------------------------------------------------------


def _normalise(s: torch.Tensor) -> torch.Tensor:
    """Per-layer z-score of log importance: comparable scales for Adam in every layer."""
    x = torch.log(s.float().clamp_min(1e-12))
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def initial_scores(model, act_norms: list[torch.Tensor], how: str, seed: int,
                   fisher: list[torch.Tensor] | None = None, fisher_weight: float = 0.5) -> torch.Tensor:
    blocks = ffn_blocks(model)
    if how == "fisher":
        raw = fisher
    elif how == "act-fisher":
        a = initial_scores(model, act_norms, "activation", seed)
        f = torch.stack([_normalise(x) for x in fisher])
        return (1 - fisher_weight) * a + fisher_weight * f
    elif how == "activation":
        raw = [a * c for a, c in zip(act_norms, down_column_norms(model))]
    elif how == "magnitude":
        raw = weight_magnitudes(model)
    elif how == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(len(blocks), blocks[0].down_proj.in_features, generator=g)
    else:
        raise PruneError(f"unknown init {how!r}")
    return torch.stack([_normalise(r) for r in raw])


# -- the loop ------------------------------------------------------------------------


@dataclass
class LearnResult:
    scores: list[torch.Tensor]
    init_scores: list[torch.Tensor]
    history: list[dict]
    seconds: float
    config: dict
    scales: list[torch.Tensor] | None = None  # per channel, all C (only the kept ones matter)
    held_out: dict | None = None  # early stopping: held-out examples, the best step and its KL
    on_policy: int = 0  # own answers added to the examples (`cfg.on_policy`)


class MaskTrainer:
    """The mask-learning state: dense targets, scores, optimiser; `loss(b)` / `step()` / `run()`.

    Use inside `frozen(model)` (``learn_scores`` does); only ``self.scores`` receives gradients.
    """

    def __init__(self, model, tok, examples: list[Example], k: int, cfg: MaskLearnConfig, *,
                 init_scores: list[torch.Tensor] | None = None, dense: DenseTargets | None = None,
                 progress: Callable[[float], None] = lambda f: None, allowed: torch.Tensor | None = None):
        """`dense`: targets from an earlier `dense_pass` over the same examples (then `init_scores`
        is required): trainers that differ only in their settings share one pass."""
        if not examples:
            raise PruneError("mask learning needs at least one training example")
        torch.manual_seed(cfg.seed)
        self.model, self.tok, self.examples, self.k, self.cfg = model, tok, examples, k, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.pad = pad_id_of(tok)
        self.P = shared_prompt_len(examples)
        if dense is not None:
            if init_scores is None:
                raise PruneError("precomputed dense targets need init_scores")
            self.dense = dense
        want_fisher = init_scores is None and cfg.init in ("fisher", "act-fisher")
        # the default Fisher (answer tokens, shared prefix) comes out of the dense pass's own forward
        fused = want_fisher and not cfg.prefix_grad and cfg.fisher_target == "answer"
        fisher = None
        if dense is None and fused:
            self.dense, acts, fisher = dense_pass(model, tok, examples, self.P, cfg.batch_size, cfg.kl_topk,
                                                  progress=progress, fisher=True)
        elif dense is None:
            self.dense, acts = dense_pass(model, tok, examples, self.P, cfg.batch_size, cfg.kl_topk,
                                          progress=progress)
        if init_scores is not None:
            init = torch.stack([x.float() for x in init_scores])
        else:
            if want_fisher and fisher is None:
                # per-example Fisher through the prefix needs the prefix per example: no sharing
                fisher = fisher_diag(model, tok, examples, 0 if cfg.prefix_grad else self.P, cfg.batch_size,
                                     dense=self.dense, sampled=cfg.fisher_target == "sampled", generator=self.gen)
            init = initial_scores(model, acts, cfg.init, cfg.seed, fisher, cfg.fisher_weight)
        if allowed is not None:  # far below any reachable score: Adam moves a score by ~lr a step
            init = init.masked_fill(~allowed.to(init.device), FORBIDDEN)
        self.init = init
        self.sc = ChannelScores(init, k, cfg)
        self.opt = torch.optim.Adam([self.sc.scores], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.history: list[dict] = []
        self._order: list[int] = []

    @property
    def scores(self) -> torch.nn.Parameter:
        return self.sc.scores

    def loss(self, b: int):
        """(loss, ce, kl) on dense batch `b` under this step's training mask (graph attached)."""
        idx = self.dense.batches[b]
        if not self.cfg.prefix_grad:
            with torch.no_grad(), channel_mask(self.model, list(self.sc.effective())):
                kv = prefix_kv(self.model, self.examples[0].ids[: self.P]) if self.P > 0 else None
        self.sc.sample(self.gen)
        try:
            with channel_mask(self.model, self.sc.layer_mask):
                if self.cfg.prefix_grad:
                    kv = prefix_kv(self.model, self.examples[0].ids[: self.P], grad=True) if self.P > 0 else None
                hidden = forward_suffixes(self.model, kv, self.P, [self.examples[i].ids[self.P:] for i in idx],
                                          self.pad)
                ce, kl, rkl = _batch_loss(self.model, hidden, self.dense, b, self.cfg)
        finally:
            self.sc._current = None
        loss = self.cfg.ce_weight * ce.mean() + self.cfg.kl_weight * kl.mean()
        if rkl is not None:
            loss = loss + self.cfg.rkl_weight * rkl.mean()
        return loss, ce, kl

    def step(self) -> dict:
        if not self._order:
            self._order = torch.randperm(len(self.dense.batches), generator=self.gen).tolist()
        b = self._order.pop()
        loss, ce, kl = self.loss(b)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        rec = {"step": len(self.history), "loss": float(loss.detach()), "ce": float(ce.detach().mean()),
               "kl": float(kl.detach().mean())}
        self.history.append(rec)
        return rec

    def extend(self, examples: list[Example]) -> None:
        """Add examples (sharing the first `P` prompt tokens): their dense targets join the batches."""
        if not examples:
            return
        d, _ = dense_pass(self.model, self.tok, examples, self.P, self.cfg.batch_size, self.cfg.kl_topk)
        off, t = len(self.examples), self.dense
        self.examples = self.examples + examples
        self.dense = DenseTargets(t.batches + [[i + off for i in b] for b in d.batches], t.pos + d.pos,
                                  t.top_idx + d.top_idx, t.top_logp + d.top_logp, t.tail_logp + d.tail_logp)
        self._order = []

    def fix_mask(self) -> None:
        """Switch to the scale phase: the mask stays as it is, the per-channel scales learn."""
        if self.sc.scale is None:
            self.opt = torch.optim.Adam([self.sc.fix_mask()], lr=self.cfg.scale_lr)

    def swapped(self) -> int:
        """Channels whose keep/drop decision differs from the initial mask."""
        return int((self.sc.hard() != _hard_topk(self.init, self.k)).sum()) // 2


def split_holdout(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): `share` of the examples, drawn with `seed`; none held out below 2 examples."""
    n_held = round(len(examples) * share) if share > 0 and len(examples) >= 2 else 0
    if not n_held:
        return examples, []
    held = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n_held].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class HeldOut:
    """Early stopping: the held-out examples' KL to the dense model under the trainer's current
    mask (times its scales); the best state seen is kept and `restore` puts it back."""

    def __init__(self, model, tok, examples: list[Example], cfg: MaskLearnConfig):
        self.model, self.tok, self.examples = model, tok, examples
        self.P = shared_prompt_len(examples)
        self.dense, _ = dense_pass(model, tok, examples, self.P, cfg.batch_size, cfg.kl_topk)
        self.best_kl, self.best_step = math.inf, None
        self._scores = self._scale = None

    def check(self, tr: MaskTrainer, step: int) -> float:
        kl = masked_losses(self.model, self.tok, self.examples, list(tr.sc.effective()), self.P, dense=self.dense)["kl"]
        if kl < self.best_kl:
            self.best_kl, self.best_step = kl, step
            self._scores = tr.sc.scores.detach().clone()
            self._scale = None if tr.sc.scale is None else tr.sc.scale.detach().clone()
        return kl

    @torch.no_grad()
    def restore(self, tr: MaskTrainer) -> None:
        if self._scores is None:
            return
        tr.sc.scores.copy_(self._scores)
        if tr.sc.scale is not None:  # a best state from the mask phase had no scales: all ones
            tr.sc.scale.copy_(self._scale if self._scale is not None else torch.ones_like(tr.sc.scale))


def _set_lr(tr: MaskTrainer, cfg: MaskLearnConfig, step: int) -> None:
    """The learning rate of `step` (global) under the schedule: each phase decays on its own."""
    mask_phase = step < cfg.steps
    base, t, n = (cfg.lr, step, cfg.steps) if mask_phase else (cfg.scale_lr, step - cfg.steps, cfg.scale_steps)
    f = 0.5 * (1 + math.cos(math.pi * t / max(n, 1))) if cfg.lr_schedule == "cosine" else 1.0
    for g in tr.opt.param_groups:
        g["lr"] = base * f


def learn_scores(model, tok, examples: list[Example], k: int, cfg: MaskLearnConfig, *,
                 progress: Callable[[float], None] = lambda f: None, log_every: int = 0,
                 init_scores: list[torch.Tensor] | None = None, allowed: torch.Tensor | None = None) -> LearnResult:
    """Learn per-channel scores whose per-layer top-k mask keeps the model close to the teacher
    (`allowed`: (L, C) bool, the only channels the mask may keep; `cfg.holdout`: early stopping on
    held-out examples)."""
    t0 = time.time()
    train, held = split_holdout(examples, cfg.holdout, cfg.seed)
    with frozen(model):
        tr = MaskTrainer(model, tok, train, k, cfg, init_scores=init_scores, progress=lambda f: progress(0.1 * f),
                         allowed=allowed)
        watch = HeldOut(model, tok, held, cfg) if held else None
        if watch:
            watch.check(tr, -1)  # the initial mask is a candidate too
        total = cfg.steps + cfg.scale_steps
        own_at = cfg.steps if cfg.on_policy_at < 0 else min(cfg.on_policy_at, cfg.steps)
        own = 0
        for step in range(total):
            if step == cfg.steps:
                if watch:  # the scales learn on the best mask
                    watch.restore(tr)
                tr.fix_mask()
            if cfg.on_policy and step == own_at:
                new = own_examples(model, tok, train, list(tr.sc.effective()), cfg.on_policy,
                                   cfg.on_policy_tokens, cfg.seed)
                tr.extend(new)
                own = len(new)
            _set_lr(tr, cfg, step)
            rec = tr.step()
            if watch and ((step + 1) % cfg.eval_every == 0 or step + 1 in (cfg.steps, total)):
                rec["held_kl"] = watch.check(tr, step)
            if log_every and (step % log_every == 0 or step == total - 1):
                print(f"  step {step:4d} loss {rec['loss']:.4f} ce {rec['ce']:.4f} kl {rec['kl']:.4f} "
                      f"swapped {tr.swapped()}" + (f" held {rec['held_kl']:.4f}" if "held_kl" in rec else ""),
                      flush=True)
            progress(0.1 + 0.9 * (step + 1) / max(total, 1))
        if watch:
            watch.restore(tr)
    final = tr.scores.detach().clone()
    scales = None if tr.sc.scale is None else list(tr.sc.scale.detach().clone())
    res = LearnResult(list(final), list(tr.init), tr.history, time.time() - t0, asdict(cfg), scales)
    res.on_policy = own
    if watch:
        res.held_out = {"examples": len(held), "best_step": watch.best_step, "best_kl": round(watch.best_kl, 4)}
    return res
