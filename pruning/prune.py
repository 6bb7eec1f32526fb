"""`prune()`: base + persona + method + sparsity -> exported NPC checkpoint."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch

from pruning import PruneError
from pruning.datasets import calibration_prompts
from pruning.export import export_checkpoint, keep_count, select_kept
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
) -> dict:
    """Score channels with `method`, keep the top-k per layer, export. Returns a summary."""
    check_args(persona, sparsity, method)
    score_fn = get_method(method)
    seed_everything(seed)
    t0 = time.time()
    progress(0.0, "loading")
    model, tok = load_model(Path(base_dir), dtype=torch.float32, device=device)
    sizes = set(intermediate_sizes(model))
    if len(sizes) != 1:
        raise PruneError("base model has layers of different FFN sizes; not supported")
    dense = sizes.pop()
    k = keep_count(dense, sparsity)
    ctx = PruneContext(
        persona=persona,
        calibration=calibration_prompts(n_calibration),
        seed=seed,
        progress=lambda f: progress(0.05 + 0.8 * f, "learning"),
    )
    progress(0.05, "learning")
    scores = score_fn(model, tok, ctx)
    kept = select_kept(scores, k)
    progress(0.9, "exporting")
    out = export_checkpoint(
        model, tok, kept, Path(out_dir),
        base_dir=Path(base_dir), method=method, sparsity=sparsity, persona=persona,
        extra={"seed": seed}, dtype=torch.bfloat16,
    )
    progress(1.0, "done")
    return {"out": str(out), "kept_per_layer": k, "dense_intermediate_size": dense,
            "seconds": round(time.time() - t0, 2)}
