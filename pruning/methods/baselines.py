"""The baseline methods: weight norms, activations on generic (or persona-prompted) prompts,
first-order Taylor importance, whole-block depth pruning, and a seeded random choice."""

from __future__ import annotations

import torch

from pruning import PruneError
from pruning.chat import prompt_ids
from pruning.methods.registry import LayerScores, PruneContext, register
from pruning.model_io import ffn_blocks, frozen, model_device


def _prompt(tok, user: str, system: str | None, ctx: PruneContext) -> torch.Tensor:
    """(1, T) ids of one calibration prompt, the user's part capped at ctx.max_length."""
    return torch.tensor([prompt_ids(tok, user, system, max_user_tokens=ctx.max_length)])


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
        device = model_device(model)
        for n, p in enumerate(prompts):
            model(_prompt(tok, p, system, ctx).to(device))
            ctx.progress((n + 1) / len(prompts))
    finally:
        for h in hooks:
            h.remove()
    return [s.sqrt().float() for s in sq]


def down_column_norms(model) -> list[torch.Tensor]:
    return [b.down_proj.weight.detach().float().norm(dim=0).cpu() for b in ffn_blocks(model)]


def weight_magnitudes(model) -> list[torch.Tensor]:
    """Per channel: |gate row| * |up row| * |down column|."""
    out = []
    for b in ffn_blocks(model):
        g = b.gate_proj.weight.detach().float().norm(dim=1)
        u = b.up_proj.weight.detach().float().norm(dim=1)
        d = b.down_proj.weight.detach().float().norm(dim=0)
        out.append((g * u * d).cpu())
    return out


# -- methods ----------------------------------------------------------------


@register("random")
def score_random(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(ctx.seed)
    return [torch.rand(b.down_proj.in_features, generator=g) for b in ffn_blocks(model)]


@register("magnitude")
def score_magnitude(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    return weight_magnitudes(model)


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
    group = [(b.gate_proj.weight, b.up_proj.weight, b.down_proj.weight) for b in ffn_blocks(model)]
    device = model_device(model)
    with frozen(model):  # only the FFN weights get gradients; every requires_grad comes back after
        for g in group:
            for w in g:
                w.requires_grad_(True)
                w.grad = None
        try:
            with torch.enable_grad():
                for n, prompt in enumerate(ctx.calibration):
                    ids = _prompt(tok, prompt, None, ctx).to(device)
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
    return out


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
    device = model_device(model)
    try:
        with torch.no_grad():
            for n, prompt in enumerate(ctx.calibration):
                ids = _prompt(tok, prompt, None, ctx).to(device)
                model(ids)
                tokens[0] += ids.shape[1]
                ctx.progress((n + 1) / len(ctx.calibration))
    finally:
        for h in handles:
            h.remove()
    return LayerScores((total / max(tokens[0], 1)).float().tolist())

