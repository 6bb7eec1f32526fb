"""Channel-importance methods: one small function each, same signature.

Every method maps (model, tokenizer, ctx) to one importance score per FFN
intermediate channel per layer; `export` keeps the top-k of each layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pruning import PruneError
from pruning.model_io import ffn_blocks

ScoreFn = Callable[..., list[torch.Tensor]]
METHODS: dict[str, ScoreFn] = {}


@dataclass
class PruneContext:
    persona: str
    calibration: list[str] = field(default_factory=list)
    seed: int = 0
    max_length: int = 256
    progress: Callable[[float], None] = lambda f: None
    # optional, used by methods that need more than calibration prompts (persona-pruner)
    sparsity: float | None = None             # the target sparsity (export keeps keep_count(C, sparsity))
    system_prompt: str | None = None          # the chat-time system prompt; None: the persona text
    options: dict = field(default_factory=dict)  # method options, e.g. {"profile": "fast", "steps": 10}
    cache_dir: Path | None = None             # reusable intermediate data (synthetic sets); None: default
    base_id: str | None = None                # identifies the base weights in cache keys (sha256)
    stage: Callable[[str], None] = lambda name: None  # the method's current stage, for progress reports
    info: dict = field(default_factory=dict)  # what a method reports back (goes into the manifest)

    @property
    def chat_system(self) -> str:
        return self.system_prompt if self.system_prompt else self.persona


def register(name: str):
    def wrap(fn: ScoreFn) -> ScoreFn:
        METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> ScoreFn:
    try:
        return METHODS[name]
    except KeyError:
        raise PruneError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


# -- shared helpers ---------------------------------------------------------


def chat_ids(tok, user: str, system: str | None = None, max_length: int = 256) -> torch.Tensor:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return torch.tensor([list(ids)[:max_length]])


@torch.no_grad()
def activation_norms(model, tok, prompts: list[str], ctx: PruneContext, system: str | None = None):
    """Per-channel L2 norm of each FFN's intermediate activation (input of down_proj)."""
    blocks = ffn_blocks(model)
    sq = [torch.zeros(b.down_proj.in_features, dtype=torch.float64) for b in blocks]
    hooks = []
    for i, b in enumerate(blocks):
        def hook(_m, args, i=i):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[i] += (a * a).sum(0).cpu()

        hooks.append(b.down_proj.register_forward_pre_hook(hook))
    try:
        device = next(model.parameters()).device
        for n, p in enumerate(prompts):
            model(chat_ids(tok, p, system, ctx.max_length).to(device))
            ctx.progress((n + 1) / len(prompts))
    finally:
        for h in hooks:
            h.remove()
    return [s.sqrt().float() for s in sq]


def down_column_norms(model) -> list[torch.Tensor]:
    return [b.down_proj.weight.detach().float().norm(dim=0).cpu() for b in ffn_blocks(model)]


# -- methods ----------------------------------------------------------------


@register("random")
def score_random(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(ctx.seed)
    return [torch.rand(b.down_proj.in_features, generator=g) for b in ffn_blocks(model)]


@register("magnitude")
def score_magnitude(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    out = []
    for b in ffn_blocks(model):
        g = b.gate_proj.weight.detach().float().norm(dim=1)
        u = b.up_proj.weight.detach().float().norm(dim=1)
        d = b.down_proj.weight.detach().float().norm(dim=0)
        out.append((g * u * d).cpu())
    return out


@register("activation")
def score_activation(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    """Wanda/FLAP-style: |W_down[:, j]| * ||a_j|| on generic calibration prompts."""
    if not ctx.calibration:
        raise PruneError("activation method needs calibration prompts")
    acts = activation_norms(model, tok, ctx.calibration, ctx)
    return [a * w for a, w in zip(acts, down_column_norms(model))]


@register("activation-persona")
def score_activation_persona(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    """The same score, measured with the persona as the system prompt."""
    if not ctx.calibration:
        raise PruneError("activation-persona method needs calibration prompts")
    acts = activation_norms(model, tok, ctx.calibration, ctx, system=ctx.persona)
    return [a * w for a, w in zip(acts, down_column_norms(model))]

