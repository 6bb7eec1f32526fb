"""`prune()`: base + persona + method + sparsity -> exported NPC checkpoint."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch

from pruning import PruneError
from pruning.checkpoint import drop_layers_inplace, export_checkpoint, fold_scales, keep_count, kept_scales, select_kept
from pruning.core import allowed_masks, inside, read_core
from pruning.datasets import calibration_prompts
from pruning.methods.persona_pruner.data import base_identity, build_dataset, default_cache_dir, rows_to_examples
from pruning.methods.registry import LayerScores, PruneContext, get_method, layers_to_drop
from pruning.model_io import intermediate_sizes, load_model
from pruning.options import (DATA_METHODS, MAX_SPARSITY, RECOVERY_DEFAULTS, RECOVERY_OPTIONS, check_options,
                             resolve_options)
from pruning.recovery import lora_recover


def check_args(persona: str, sparsity: float, method: str) -> None:
    if not persona or not persona.strip():
        raise PruneError("persona is empty")
    if not 0 < sparsity <= MAX_SPARSITY:
        raise PruneError(f"sparsity must be in (0, {MAX_SPARSITY}], got {sparsity}")
    get_method(method)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def prune(
    base_dir: Path,
    persona: str,
    sparsity: float,
    method: str,
    out_dir: Path,
    *,
    seed: int = 0,
    n_calibration: int = 32,
    progress: Callable[[float, str], None] = lambda f, stage: None,
    device: str = "cpu",
    options: dict | None = None,
    system_prompt: str | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Score with `method`, keep the top-k channels per layer (or drop blocks), export.

    `options` are method options (persona-pruner: {"profile": "fast"|"default"|"thorough", ...},
    any method: {"recover": true} for LoRA recovery on the persona's synthetic data);
    `system_prompt` is the chat-time system prompt when it is not the persona text itself;
    `cache_dir` holds reusable intermediate data (persona-pruner's synthetic sets).
    """
    options = dict(options or {})
    check_args(persona, sparsity, method)
    core = read_core(base_dir)
    if core is not None:  # an NPC within a shared core: learned on the dense base, kept inside the core
        if sparsity < core.sparsity - 1e-9:
            raise PruneError(f"sparsity {sparsity} is below its base's core ({core.sparsity}): an NPC of a core "
                             "keeps a subset of the core's channels")
        base_dir = core.dense_dir
    check_options(method, options)
    score_fn = get_method(method)
    seed_everything(seed)
    t0 = time.time()
    progress(0.0, "loading")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, tok = load_model(Path(base_dir), dtype=dtype, device=device)
    sizes = set(intermediate_sizes(model))
    if len(sizes) != 1:
        raise PruneError("base model has layers of different FFN sizes; not supported")
    dense = sizes.pop()
    k = keep_count(dense, sparsity)
    recover = bool(options.pop("recover", False))
    lora = {key: options.pop(key) for key in list(options) if key in RECOVERY_OPTIONS}
    stage = ["learning"]  # methods with several stages report them through ctx.stage
    span = (0.05, 0.75 if recover else 0.85)

    def set_stage(name: str) -> None:
        stage[0] = name

    ctx = PruneContext(
        persona=persona,
        calibration=calibration_prompts(n_calibration),
        seed=seed,
        progress=lambda f: progress(span[0] + (span[1] - span[0]) * f, stage[0]),
        sparsity=sparsity,
        system_prompt=system_prompt,
        options=options if method in DATA_METHODS else {},
        cache_dir=Path(cache_dir) if cache_dir else None,
        stage=set_stage,
        allowed=allowed_masks(core, dense) if core is not None else None,
    )
    progress(0.05, "learning")
    scores = score_fn(model, tok, ctx)
    dropped: list[int] = []
    if isinstance(scores, LayerScores) and core is not None:
        raise PruneError("depth pruning drops whole blocks and cannot run within a core; use the dense base")
    if core is not None:  # every method's top-k, learned or not, stays inside the core
        scores = inside(scores, ctx.allowed)
    if isinstance(scores, LayerScores):
        dropped = layers_to_drop(model, scores, sparsity)
        kept = None
        ctx.info["layer_scores"] = [round(float(x), 6) for x in scores]
    else:
        kept = select_kept(scores, k)
    scales = kept_scales(ctx.channel_scales, kept) if kept is not None else None
    if scales is not None:  # before recovery, which trains the model that is exported
        fold_scales(model, kept, scales)
    extra = {"seed": seed, **({"system_prompt": system_prompt} if system_prompt else {}), **ctx.info}
    if recover:
        if dropped:  # recovery trains the depth-pruned model, so the blocks go first
            extra.update(dropped_layers=list(dropped), dense_num_hidden_layers=model.config.num_hidden_layers)
        extra["recovery"] = _recover(model, tok, kept, dropped, ctx, options, lora, seed,
                                     lambda f: progress(0.75 + 0.15 * f, "recovering"))
        extra["compact"] = False  # the weights changed: kept indices alone no longer rebuild them
    progress(0.9, "exporting")
    out = export_checkpoint(
        model, tok, kept, Path(out_dir),
        base_dir=Path(base_dir), method=method, sparsity=sparsity, persona=persona,
        extra=extra, dtype=torch.bfloat16, dropped_layers=dropped, scales=scales,
        within=core if extra.get("compact", True) else None,
    )
    progress(1.0, "done")
    return {"out": str(out), "kept_per_layer": k if kept is not None else dense, "dense_intermediate_size": dense,
            "dropped_layers": extra.get("dropped_layers", dropped), "seconds": round(time.time() - t0, 2)}


def _recover(model, tok, kept, dropped, ctx, options, lora, seed, progress) -> dict:
    """LoRA on the persona's synthetic set (built or read from the cache), merged into `model`."""
    data_ctx = PruneContext(persona=ctx.persona, seed=seed, sparsity=ctx.sparsity, system_prompt=ctx.system_prompt,
                            options=options, cache_dir=ctx.cache_dir, stage=ctx.stage)
    opts = resolve_options(options)
    cache = (ctx.cache_dir or default_cache_dir()) if opts["use_cache"] else None
    rows, _ = build_dataset(model, tok, data_ctx, opts, base_identity(model), cache)
    examples = rows_to_examples(tok, data_ctx.chat_system, rows)
    ctx.stage("recovering")
    if dropped:
        drop_layers_inplace(model, dropped)
        dropped.clear()  # already applied; export must not drop again
    lora = {**RECOVERY_DEFAULTS, **lora}
    return lora_recover(model, tok, kept, examples, steps=int(lora["lora_steps"]), rank=int(lora["lora_rank"]),
                        lr=float(lora["lora_lr"]), seed=seed, progress=progress)
