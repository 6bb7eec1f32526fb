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
examples: ce_weight * cross-entropy + kl_weight * KL(dense-with-persona || masked). The dense
distributions are computed once (no grad) and kept as top-K log-probs plus one tail bucket.
Scores start from the activation importance measured on the same examples, normalised per
layer (z-score of the log), and only the scores are optimised (Adam). The shared system
prompt is re-encoded under the current hard mask (no grad) every step and its KV cache
reused by the batch: the forward is exact; the gradient ignores the path through the
prefix's keys/values.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F

from pruning import PruneError, check_number
from pruning.batching import (Example, channel_mask, forward_suffixes, kept_masks, length_batches, pad_id_of,
                              prefix_kv, scored_positions, shared_prompt_len)
from pruning.model_io import ffn_blocks

VARIANTS = ("ste", "gumbel", "soft-topk")
INITS = ("act-fisher", "activation", "fisher", "magnitude", "random")


@dataclass(frozen=True)
class MaskLearnConfig:
    steps: int = 60
    batch_size: int = 8
    lr: float = 0.05
    ce_weight: float = 0.0
    kl_weight: float = 1.0
    variant: str = "ste"
    ste_grad: str = "identity"        # "identity" | "sigmoid"
    temperature: float = 0.5          # gumbel / soft-topk / sigmoid-STE slope, in score units
    kl_topk: int = 64                 # dense distribution kept as top-K + tail bucket
    init: str = "act-fisher"          # "act-fisher" | "activation" | "fisher" | "magnitude" | "random"
    fisher_weight: float = 0.5        # act-fisher: weight of the Fisher z-scores vs activation z-scores
    fisher_target: str = "answer"     # "answer" (empirical Fisher) | "sampled" (tokens drawn from dense)
    weight_decay: float = 0.0
    # gradients through the system prompt's keys/values too (the persona prompt is most of the
    # context: 170-515 tokens in the eval personas); False reuses a no-grad prefix per step
    prefix_grad: bool = False
    # after the mask's steps, this many steps learn a real scale per kept channel (init 1) with the
    # mask fixed: it restores FFN output the dropped channels took away; export folds it into
    # down_proj's columns (0: the plain mask)
    scale_steps: int = 0
    scale_lr: float = 0.01
    seed: int = 0
    max_length: int = 512

    def __post_init__(self):  # a bad option fails before any data is built (and is a 400 in the API)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "float"):
                check_number(f.name, v, *_RANGES.get(f.name, (-math.inf, math.inf)), integer=f.type == "int")
            elif f.type == "bool" and not isinstance(v, bool):
                raise PruneError(f"option {f.name} must be true or false, got {v!r}")
        for name, allowed in (("variant", VARIANTS), ("ste_grad", ("identity", "sigmoid")), ("init", INITS),
                              ("fisher_target", ("answer", "sampled"))):
            if getattr(self, name) not in allowed:
                raise PruneError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")


# bounds a caller may set: step counts a worker finishes in hours, not weeks
_RANGES = {"steps": (0, 5000), "scale_steps": (0, 5000), "batch_size": (1, 256), "kl_topk": (1, 4096),
           "max_length": (16, 8192), "lr": (0, 10), "scale_lr": (0, 10), "ce_weight": (0, 100),
           "kl_weight": (0, 100), "temperature": (0, 100), "fisher_weight": (0, 1), "weight_decay": (0, 10),
           "seed": (0, 2**32 - 1)}


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


# -- data passes -------------------------------------------------------------------


def _logp_at(model, hidden, rows, cols) -> torch.Tensor:
    h = hidden[rows.to(hidden.device), cols.to(hidden.device)]
    return F.log_softmax(model.lm_head(h).float(), dim=-1)


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
                logp = _logp_at(model, hidden, rows, cols) if kl_topk else None
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
        logq = _logp_at(model, forward_suffixes(model, kv, P, sfx, pad), rows, cols)
        ce = F.nll_loss(logq, tgt.to(logq.device), reduction="none")
        per_ex = torch.zeros(len(sfx)).index_add(0, rows, ce.float().cpu())
        counts = torch.bincount(rows, minlength=len(sfx)).clamp_min(1)
        (per_ex / counts).sum().backward()
    return (m.grad[:, :, 0, :].double() ** 2).sum(1), logq.detach()


def _kl_topk(logq: torch.Tensor, top_idx, top_logp, tail_logp) -> torch.Tensor:
    """Per-token KL(p || q) over the K dense-top tokens plus one bucket for the rest."""
    q_top = logq.gather(-1, top_idx)
    q_tail = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-6))
    p_top = top_logp.exp()
    kl = (p_top * (top_logp - q_top)).sum(-1) + tail_logp.exp() * (tail_logp - q_tail)
    return kl


def _batch_loss(model, hidden, dt: DenseTargets, b: int, cfg: MaskLearnConfig):
    rows, cols, tgt = dt.pos[b]
    logq = _logp_at(model, hidden, rows, cols)
    ce = F.nll_loss(logq, tgt.to(logq.device), reduction="none")
    kl = _kl_topk(logq, dt.top_idx[b], dt.top_logp[b], dt.tail_logp[b])
    return ce, kl


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
            logq = _logp_at(model, hidden, rows, cols)
            ce_sum += float(F.nll_loss(logq, tgt.to(logq.device), reduction="sum"))
            if dense is not None:
                kl_sum += float(_kl_topk(logq, dense.top_idx[b], dense.top_logp[b], dense.tail_logp[b]).sum())
            n += len(tgt)
    out = {"ce": ce_sum / max(n, 1), "tokens": n}
    if dense is not None:
        out["kl"] = kl_sum / max(n, 1)
    return out


# -- initial scores ------------------------------------------------------------------


def _normalise(s: torch.Tensor) -> torch.Tensor:
    """Per-layer z-score of log importance: comparable scales for Adam in every layer."""
    x = torch.log(s.float().clamp_min(1e-12))
    return (x - x.mean()) / x.std().clamp_min(1e-6)


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
        raw = [a * b.down_proj.weight.detach().float().norm(dim=0).cpu() for a, b in zip(act_norms, blocks)]
    elif how == "magnitude":
        raw = [(b.gate_proj.weight.detach().float().norm(dim=1) * b.up_proj.weight.detach().float().norm(dim=1)
                * b.down_proj.weight.detach().float().norm(dim=0)).cpu() for b in blocks]
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


@contextmanager
def frozen(model):
    """Weights with requires_grad=False for the duration (restored afterwards)."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, g in zip(params, was):
            p.requires_grad_(g)


class MaskTrainer:
    """The mask-learning state: dense targets, scores, optimiser; `loss(b)` / `step()` / `run()`.

    Use inside `frozen(model)` (``learn_scores`` does); only ``self.scores`` receives gradients.
    """

    def __init__(self, model, tok, examples: list[Example], k: int, cfg: MaskLearnConfig, *,
                 init_scores: list[torch.Tensor] | None = None, dense: DenseTargets | None = None,
                 progress: Callable[[float], None] = lambda f: None):
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
                ce, kl = _batch_loss(self.model, hidden, self.dense, b, self.cfg)
        finally:
            self.sc._current = None
        loss = self.cfg.ce_weight * ce.mean() + self.cfg.kl_weight * kl.mean()
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

    def fix_mask(self) -> None:
        """Switch to the scale phase: the mask stays as it is, the per-channel scales learn."""
        if self.sc.scale is None:
            self.opt = torch.optim.Adam([self.sc.fix_mask()], lr=self.cfg.scale_lr)

    def swapped(self) -> int:
        """Channels whose keep/drop decision differs from the initial mask."""
        return int((self.sc.hard() != _hard_topk(self.init, self.k)).sum()) // 2


def learn_scores(model, tok, examples: list[Example], k: int, cfg: MaskLearnConfig, *,
                 progress: Callable[[float], None] = lambda f: None, log_every: int = 0,
                 init_scores: list[torch.Tensor] | None = None) -> LearnResult:
    """Learn per-channel scores whose per-layer top-k mask keeps the model close to the teacher."""
    t0 = time.time()
    with frozen(model):
        tr = MaskTrainer(model, tok, examples, k, cfg, init_scores=init_scores, progress=lambda f: progress(0.1 * f))
        total = cfg.steps + cfg.scale_steps
        for step in range(total):
            if step == cfg.steps:
                tr.fix_mask()
            rec = tr.step()
            if log_every and (step % log_every == 0 or step == total - 1):
                print(f"  step {step:4d} loss {rec['loss']:.4f} ce {rec['ce']:.4f} kl {rec['kl']:.4f} "
                      f"swapped {tr.swapped()}", flush=True)
            progress(0.1 + 0.9 * (step + 1) / max(total, 1))
    final = tr.scores.detach().clone()
    scales = None if tr.sc.scale is None else list(tr.sc.scale.detach().clone())
    return LearnResult(list(final), list(tr.init), tr.history, time.time() - t0, asdict(cfg), scales)


PROFILES: dict[str, dict] = {
    # tests: seconds
    "fast": dict(n_instructions=8, pool_size=48, n_references=2, max_new_tokens=24,
                 learn=dict(steps=6, batch_size=4, lr=0.05, scale_steps=4)),
    # the service default: a few minutes on 2 CPU cores
    # 256 answers come from a vLLM teacher in ~1.5 min (teacher_backend auto); 256 beat 64 by
    # 4 % persona / 8 % general KL (docs/quality_experiments.md)
    # then 32 steps of per-channel scales on the fixed mask: -4 to -5 % persona KL, -3 to -4 %
    # general, 70-120 s (docs/quality_experiments.md)
    # data_tokens: fewer instructions behind a persona prompt over ~550 tokens (every stage runs
    # the whole prompt per example), so that a 1,000-token persona still prunes in under 10 minutes
    "default": dict(n_instructions=256, pool_size=512, n_references=8, max_new_tokens=64, data_tokens=170_000,
                    learn=dict(steps=16, batch_size=8, lr=0.05, scale_steps=32)),
    # twice the default's data over the whole pool and all references, longer answers, 2 epochs:
    # -3.5 / -9.8 % persona KL on personas 0 and 3, general level, ~19 min per persona
    # (docs/quality_experiments.md)
    "thorough": dict(n_instructions=512, pool_size=None, n_references=None, max_new_tokens=96,
                     learn=dict(steps=128, batch_size=8, lr=0.03, scale_steps=64)),
}


def profile(name: str) -> dict:
    try:
        p = PROFILES[name]
    except KeyError:
        raise PruneError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
    return {**p, "learn": dict(p["learn"])}


def config_for(profile_name: str, **overrides) -> MaskLearnConfig:
    cfg = MaskLearnConfig(**profile(profile_name)["learn"])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def kept_from_scores(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    from pruning.export import select_kept

    return select_kept(scores, k)


def hard_masks(model, scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    return kept_masks(model, kept_from_scores(scores, k))
