"""One export path for every method: structural FFN pruning to a HF checkpoint.

A pruned NPC is fully described by its kept channel indices per layer (the
compact form, a few KB), plus a scale per kept channel when the method learned
them (folded into down_proj's columns); `materialize` rebuilds the identical
weights from the base checkpoint, and `export_checkpoint` writes a standard HF
directory vLLM loads.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pruning import PruneError
from pruning.files import write_atomic_dir
from pruning.manifest import Manifest, checkpoint_sha256
from pruning.model_io import ffn_blocks


def keep_count(intermediate: int, sparsity: float, multiple: int = 16) -> int:
    """Channels kept per layer, rounded to a kernel-friendly multiple."""
    if not 0 < sparsity < 1:
        raise PruneError(f"sparsity must be in (0, 1), got {sparsity}")
    k = round(intermediate * (1 - sparsity) / multiple) * multiple
    return max(multiple, min(intermediate, k))


def select_kept(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Top-k per layer, returned sorted so channel order is preserved."""
    kept = []
    for s in scores:
        idx = torch.topk(s.float(), k, sorted=False).indices
        kept.append(torch.sort(idx).values.long())
    return kept


def _slice_linear(lin: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
    w = lin.weight.detach().index_select(dim, idx.to(lin.weight.device)).clone()
    out_f, in_f = w.shape
    new = torch.nn.Linear(in_f, out_f, bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        b = lin.bias.detach()
        new.bias.data.copy_(b.index_select(0, idx.to(b.device)) if dim == 0 else b)
    return new


@torch.no_grad()
def prune_inplace(model, kept: list[torch.Tensor]) -> None:
    """Drop FFN channels: gate/up rows and down columns, config updated."""
    blocks = ffn_blocks(model)
    if len(kept) != len(blocks):
        raise PruneError(f"kept indices for {len(kept)} layers, model has {len(blocks)}")
    sizes = {len(k) for k in kept}
    for b, idx in zip(blocks, kept):
        b.gate_proj = _slice_linear(b.gate_proj, idx, 0)
        b.up_proj = _slice_linear(b.up_proj, idx, 0)
        b.down_proj = _slice_linear(b.down_proj, idx, 1)
        if hasattr(b, "intermediate_size"):
            b.intermediate_size = len(idx)
    # vLLM and transformers need one intermediate_size; per-layer sizes would need a list.
    if len(sizes) != 1:
        raise PruneError("kept channel counts differ between layers; uniform counts are required")
    model.config.intermediate_size = sizes.pop()


def kept_scales(scales: list[torch.Tensor] | None, kept: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The scales of the kept channels, per layer in kept order (None: no scales)."""
    if scales is None:
        return None
    return [s.float().cpu().index_select(0, idx.cpu()) for s, idx in zip(scales, kept)]


def scaled_columns(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """down_proj weight (H, k) with column j times scale[j], computed in fp32, in w's dtype."""
    return (w.float() * scale.float().to(w.device)[None, :]).to(w.dtype)


@torch.no_grad()
def fold_scales(model, kept: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
    """Multiply the kept down_proj columns of the dense model by their scales (in place)."""
    for b, idx, sc in zip(ffn_blocks(model), kept, scales):
        w = b.down_proj.weight
        i = idx.to(w.device)
        w[:, i] = scaled_columns(w[:, i], sc)


def _short_floats(t: torch.Tensor) -> list[float]:
    """Each float32 as the shortest decimal that reads back as the same float32 (half the JSON of
    a double's repr); the rare one that would not survive the double-to-float32 step stays long."""
    a = t.detach().float().cpu().numpy()
    short = [float(str(v)) for v in a]
    same = np.array(short, dtype=np.float64).astype(np.float32) == a
    return [x if ok else float(v) for x, ok, v in zip(short, same, a)]


def scales_to_json(scales: list[torch.Tensor] | None) -> list[list[float]] | None:
    return None if scales is None else [_short_floats(s) for s in scales]


def scales_from_json(rows: list[list[float]] | None) -> list[torch.Tensor] | None:
    return None if rows is None else [torch.tensor(r, dtype=torch.float32) for r in rows]


@torch.no_grad()
def zero_dropped(model, kept: list[torch.Tensor]) -> None:
    """The masked dense model: dropped channels' down columns set to zero."""
    for b, idx in zip(ffn_blocks(model), kept):
        mask = torch.zeros(b.down_proj.in_features, dtype=torch.bool)
        mask[idx] = True
        b.down_proj.weight[:, ~mask.to(b.down_proj.weight.device)] = 0


@torch.no_grad()
def drop_layers_inplace(model, dropped: list[int]) -> None:
    """Remove whole decoder blocks; the rest are renumbered so KV caches index them densely."""
    layers = model.model.layers
    drop = set(dropped)
    if not drop or any(not 0 <= i < len(layers) for i in drop) or len(drop) >= len(layers):
        raise PruneError(f"cannot drop layers {sorted(drop)} of {len(layers)}")
    keep = [layer for i, layer in enumerate(layers) if i not in drop]
    for j, layer in enumerate(keep):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j
    model.model.layers = torch.nn.ModuleList(keep)
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]
    cfg.num_hidden_layers = len(keep)


def kept_to_json(kept: list[torch.Tensor]) -> list[list[int]]:
    return [k.tolist() for k in kept]


def kept_from_json(rows: list[list[int]]) -> list[torch.Tensor]:
    return [torch.tensor(r, dtype=torch.long) for r in rows]


def materialize(base_dir: Path, kept: list[torch.Tensor] | None,
                dropped_layers: list[int] | None = None,
                scales: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The pruned state dict from the base's safetensors by index-select (no model build).

    `kept` indexes the layers that remain after `dropped_layers` (None: every channel kept);
    `scales` (per layer, kept order) multiply the kept down_proj columns."""
    from safetensors import safe_open

    drop = sorted(set(dropped_layers or []))
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                layer = _layer_of(name)
                if layer is not None and drop:
                    if layer in drop:
                        continue
                    new = layer - sum(1 for d in drop if d < layer)
                    name = name.replace(f"layers.{layer}.", f"layers.{new}.", 1)
                    layer = new
                if kept is None:
                    pass
                elif layer is not None and (".mlp.gate_proj." in name or ".mlp.up_proj." in name):
                    t = t.index_select(0, kept[layer])
                elif layer is not None and ".mlp.down_proj.weight" in name:
                    t = t.index_select(1, kept[layer])
                    if scales is not None:
                        t = scaled_columns(t, scales[layer])
                out[name] = t.contiguous()
    return out


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def export_checkpoint(
    model,
    tok,
    kept: list[torch.Tensor],
    out_dir: Path,
    *,
    base_dir: Path,
    method: str,
    sparsity: float,
    persona: str,
    extra: dict | None = None,
    dtype: torch.dtype | None = None,
    dropped_layers: list[int] | None = None,
    scales: list[torch.Tensor] | None = None,
    within=None,
) -> Path:
    """Prune `model` in place and write HF safetensors + config + manifest atomically.

    Channel pruning keeps `kept` per layer; depth pruning drops `dropped_layers` (then
    `kept` may be None: the remaining blocks keep every channel). `scales` (per layer, kept
    order) are recorded for the compact form; the caller has folded them into `model`
    already (`fold_scales`), so that what it evaluates or recovers is what is exported.
    `within` (a `pruning.core.CoreInfo`): `kept` lies inside that core, and the compact form is
    written over the core (its dir, its sha256, positions in it), so engines running the core
    serve this checkpoint; the weights written are the same."""
    base_dir = Path(base_dir)
    compact = {}
    if within is not None and kept is not None:
        from pruning.core import to_core_indexing

        compact = {"base_model": str(Path(within.core_dir).resolve()), "base_sha256": within.sha256,
                   "kept_indices": to_core_indexing(kept, within), "dense_intermediate_size": len(within.kept[0]),
                   # not "core": that key makes a directory a core (pruning.core.read_core)
                   "within_core": {"dense_base": str(within.dense_dir.resolve()), "dense_sha256": within.dense_sha256,
                            "sparsity": within.sparsity}}
    dense_size = model.config.intermediate_size
    dense_layers = model.config.num_hidden_layers
    if dropped_layers:
        drop_layers_inplace(model, dropped_layers)
    if kept is not None:
        prune_inplace(model, kept)
    if dtype is not None:
        model.to(dtype)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        Manifest({
            "format": "npc-pruned/1",
            "base_model": str(base_dir.resolve()),
            "base_sha256": checkpoint_sha256(base_dir),
            "method": method,
            "sparsity": sparsity,
            "dense_intermediate_size": dense_size,
            "intermediate_size": model.config.intermediate_size,
            "kept_indices": kept_to_json(kept) if kept is not None else None,
            "channel_scales": scales_to_json(scales),
            "dense_num_hidden_layers": dense_layers,
            "num_hidden_layers": model.config.num_hidden_layers,
            "dropped_layers": sorted(dropped_layers or []),
            "persona": persona,
            "created": time.time(),
            **(extra or {}),
            **compact,
        }).seal(tmp)  # every file's digest, so a loader can refuse a corrupt or incomplete copy

    return write_atomic_dir(out_dir, fill)
