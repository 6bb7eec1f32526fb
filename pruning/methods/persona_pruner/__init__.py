"""Persona-Pruner: filter persona-sensitive instructions, rewrite them in character, learn the mask.

    scores = persona_pruner(model, tok, ctx)     # registered as method "persona-pruner"

1. sensitivity  (sensitivity.py): the top-N instructions of the pool whose middle-layer
   representation moves most with the persona vs reference personas;
2. rewriting    (teacher.py): the teacher (default: the base model) answers them with the
   persona as the system prompt; the set is cached as JSONL keyed by everything that shapes it
   (data.py puts the stages together);
3. mask learning (masklearn.py, on the dense model's targets of targets.py): a per-layer top-k
   channel mask trained through a straight-through estimator to keep the masked model's answers
   close to the teacher's, then (``scale_steps``) a scale per kept channel learned on the same
   loss with the mask fixed.

The returned scores are the learned real-valued scores, so export's per-layer top-k is the
learned mask; the scales go back through ``ctx.channel_scales`` and export folds them into
down_proj. Options come from `ctx.options` on top of a profile (`fast`, `default`,
`thorough`); see `pruning.options.OPTIONS`.
"""

from __future__ import annotations

import time

import torch

from pruning import PruneError
from pruning.checkpoint import keep_count
from pruning.methods.baselines import down_column_norms
from pruning.methods.persona_pruner.data import persona_examples
from pruning.methods.persona_pruner.masklearn import learn_scores
from pruning.methods.persona_pruner.targets import dense_pass
from pruning.methods.registry import PruneContext, register
from pruning.model_io import ffn_blocks
from pruning.options import DEFAULT_SPARSITY, learn_config
from pruning.prefix_forward import shared_prompt_len


@register("persona-pruner")
def persona_pruner(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    """Learned per-channel scores (top-k per layer = the learned mask)."""
    t0 = time.time()
    blocks = ffn_blocks(model)
    sizes = {b.down_proj.in_features for b in blocks}
    if len(sizes) != 1:
        raise PruneError("persona-pruner needs the same FFN size in every layer")
    k = keep_count(sizes.pop(), ctx.sparsity if ctx.sparsity is not None else DEFAULT_SPARSITY)
    with persona_examples(model, tok, ctx) as (work, examples, opts, info):
        cfg = learn_config(opts, ctx.seed)
        ctx.stage("learning")
        res = learn_scores(work, tok, examples, k, cfg, progress=lambda f: ctx.progress(0.4 + 0.6 * f),
                           log_every=int(opts.get("log_every") or 0), allowed=ctx.allowed)
    h = res.history
    info.update(profile=opts["profile"], variant=cfg.variant, steps=cfg.steps, examples=len(examples),
                loss={"ce_weight": cfg.ce_weight, "kl_weight": cfg.kl_weight, "rkl_weight": cfg.rkl_weight},
                learn_s=round(res.seconds, 2), total_s=round(time.time() - t0, 2),
                loss_first=round(h[0]["loss"], 4) if h else None, loss_last=round(h[-1]["loss"], 4) if h else None)
    if res.on_policy:
        info["on_policy"] = res.on_policy
    if res.held_out is not None:
        info["held_out"] = res.held_out
    if res.scales is not None:
        ctx.channel_scales = [x.float().cpu() for x in res.scales]
        info["scale_steps"] = cfg.scale_steps
    ctx.info.update({"persona_pruner": info})
    ctx.progress(1.0)
    return [s.float().cpu() for s in res.scores]


@register("activation-persona")
def activation_persona(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    """The ablation: Wanda/FLAP-style activation scores (activation norm x down_proj column norm)
    measured on persona-pruner's own synthetic data (same options, same cache): the data
    without the learning."""
    t0 = time.time()
    with persona_examples(model, tok, ctx) as (work, examples, opts, info):
        ctx.stage("scoring")
        P = shared_prompt_len(examples)
        _, acts = dense_pass(work, tok, examples, P, learn_config(opts).batch_size, 0,
                             progress=lambda f: ctx.progress(0.4 + 0.6 * f))
        cols = down_column_norms(work)
    info.update(profile=opts["profile"], examples=len(examples), total_s=round(time.time() - t0, 2))
    ctx.info.update({"activation_persona": info})
    ctx.progress(1.0)
    return [a * c for a, c in zip(acts, cols)]
