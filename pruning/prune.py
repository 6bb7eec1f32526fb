"""`prune()`: base + persona + method + sparsity -> exported NPC checkpoint."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch

from pruning import PruneError, check_number
from pruning.datasets import calibration_prompts
from pruning.export import export_checkpoint, fold_scales, keep_count, kept_scales, select_kept
from pruning.methods import PruneContext, get_method
from pruning.model_io import intermediate_sizes, load_model

MAX_SPARSITY = 0.9


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


RECOVERY_OPTIONS = {"recover", "lora_steps", "lora_rank", "lora_lr"}


def check_options(method: str, options: dict) -> None:
    from pruning.persona_pruner import OPTIONS

    unknown = set(options) - OPTIONS - RECOVERY_OPTIONS
    if unknown:
        raise PruneError(f"unknown options for {method}: {', '.join(sorted(unknown))}")
    if "recover" in options and not isinstance(options["recover"], bool):
        raise PruneError(f"option recover must be true or false, got {options['recover']!r}")
    for name, lo, hi, integer in (("lora_steps", 1, 5000, True), ("lora_rank", 1, 256, True),
                                  ("lora_lr", 0, 1, False)):
        if options.get(name) is not None:
            check_number(name, options[name], lo, hi, integer=integer)


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
    from pruning.methods import LayerScores, layers_to_drop
    from pruning.persona_pruner import DATA_METHODS

    options = dict(options or {})
    check_args(persona, sparsity, method)
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
    )
    progress(0.05, "learning")
    scores = score_fn(model, tok, ctx)
    dropped: list[int] = []
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
    )
    progress(1.0, "done")
    return {"out": str(out), "kept_per_layer": k if kept is not None else dense, "dense_intermediate_size": dense,
            "dropped_layers": extra.get("dropped_layers", dropped), "seconds": round(time.time() - t0, 2)}


def _recover(model, tok, kept, dropped, ctx, options, lora, seed, progress) -> dict:
    """LoRA on the persona's synthetic set (built or read from the cache), merged into `model`."""
    from pruning.batching import make_examples
    from pruning.export import drop_layers_inplace
    from pruning.persona_pruner import base_identity, build_dataset, default_cache_dir, resolve_options
    from pruning.recovery import lora_recover

    data_ctx = PruneContext(persona=ctx.persona, seed=seed, sparsity=ctx.sparsity, system_prompt=ctx.system_prompt,
                            options=options, cache_dir=ctx.cache_dir, stage=ctx.stage)
    opts = resolve_options(data_ctx)
    cache = (ctx.cache_dir or default_cache_dir()) if opts["use_cache"] else None
    rows, _ = build_dataset(model, tok, data_ctx, opts, base_identity(model), cache)
    examples = make_examples(tok, data_ctx.chat_system, [r["instruction"] for r in rows],
                             [r["answer"] for r in rows], [bool(r.get("finished", True)) for r in rows])
    ctx.stage("recovering")
    if dropped:
        drop_layers_inplace(model, dropped)
        dropped.clear()  # already applied; export must not drop again
    return lora_recover(model, tok, kept, examples, steps=int(lora.get("lora_steps", 30)),
                        rank=int(lora.get("lora_rank", 8)), lr=float(lora.get("lora_lr", 5e-4)), seed=seed,
                        progress=progress)
