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
    # what a method may return beside its scores: a multiplier per FFN channel and layer (all C),
    # folded into down_proj's kept columns at export (persona-pruner's `channel_scales`)
    channel_scales: list[torch.Tensor] | None = None

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


def _template_ids(tok, msgs: list[dict], **kw) -> list[int]:
    ids = tok.apply_chat_template(msgs, tokenize=True, **kw)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def chat_ids(tok, user: str, system: str | None = None, max_length: int = 256) -> torch.Tensor:
    """The chat prompt's ids; `max_length` caps the user's part, never the system prompt (which
    is what a persona-conditioned score measures: cutting it dropped the question altogether
    behind a long persona)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    ids = _template_ids(tok, msgs, add_generation_prompt=True)
    head = len(_template_ids(tok, msgs[:1])) if system else 0
    return torch.tensor([ids[:head + max_length]])


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


@register("activation-prompt")
def score_activation_prompt(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    """The same score on the generic calibration prompts with the persona as the system prompt
    (the persona's prompt without its synthetic data; `activation-persona` uses the data)."""
    if not ctx.calibration:
        raise PruneError("activation-prompt method needs calibration prompts")
    acts = activation_norms(model, tok, ctx.calibration, ctx, system=ctx.chat_system)
    return [a * w for a, w in zip(acts, down_column_norms(model))]


@register("taylor")
def score_taylor(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    """LLM-Pruner-style first order: sum of |w * dL/dw| over each channel's group
    (gate row, up row, down column), LM loss on generic calibration prompts."""
    if not ctx.calibration:
        raise PruneError("taylor method needs calibration prompts")
    blocks = ffn_blocks(model)
    group = [(b.gate_proj.weight, b.up_proj.weight, b.down_proj.weight) for b in blocks]
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    for g in group:
        for w in g:
            w.requires_grad_(True)
            w.grad = None
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for n, prompt in enumerate(ctx.calibration):
                ids = chat_ids(tok, prompt, None, ctx.max_length).to(device)
                (model(ids, labels=ids).loss / len(ctx.calibration)).backward()
                ctx.progress((n + 1) / len(ctx.calibration))
        out = []
        for gate, up, down in group:
            s = ((gate * gate.grad).abs().sum(1) + (up * up.grad).abs().sum(1)
                 + (down * down.grad).abs().sum(0))
            out.append(s.detach().float().cpu())
    finally:
        for g in group:
            for w in g:
                w.grad = None
        for p, r in zip(params, was):
            p.requires_grad_(r)
    return out


class LayerScores(list):
    """One importance per decoder block (not per channel): the method drops whole blocks."""


def block_param_counts(model) -> tuple[int, int]:
    """(parameters of one decoder block, parameters of its FFN)."""
    layer = model.model.layers[0]
    return sum(p.numel() for p in layer.parameters()), sum(p.numel() for p in layer.mlp.parameters())


def blocks_to_drop(model, sparsity: float) -> int:
    """Whole blocks whose parameters match `sparsity` of every FFN's parameters."""
    n_layers = len(model.model.layers)
    block, ffn = block_param_counts(model)
    n = round(sparsity * n_layers * ffn / block)
    return max(1, min(n_layers - 1, n))


def layers_to_drop(model, scores: LayerScores, sparsity: float) -> list[int]:
    """The least influential blocks, as many as `blocks_to_drop`, in layer order."""
    n = blocks_to_drop(model, sparsity)
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n])


@register("depth")
def score_depth(model, tok, ctx: PruneContext) -> LayerScores:
    """ShortGPT-style block influence: mean 1 - cos(block input, block output) over the tokens
    of generic calibration prompts; the least influential blocks are dropped."""
    if not ctx.calibration:
        raise PruneError("depth method needs calibration prompts")
    layers = model.model.layers
    total = torch.zeros(len(layers), dtype=torch.float64)
    tokens = [0]

    def hook(_m, args, kwargs, output, i):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
        total[i] += (1 - cos).sum().double().cpu()

    handles = [layer.register_forward_hook(lambda m, a, k, o, i=i: hook(m, a, k, o, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for n, prompt in enumerate(ctx.calibration):
                ids = chat_ids(tok, prompt, None, ctx.max_length).to(device)
                model(ids)
                tokens[0] += ids.shape[1]
                ctx.progress((n + 1) / len(ctx.calibration))
    finally:
        for h in handles:
            h.remove()
    return LayerScores((total / max(tokens[0], 1)).float().tolist())


# Methods defined in their own modules register themselves on import.
from pruning import persona_pruner as _persona_pruner  # noqa: E402,F401  ("persona-pruner")
