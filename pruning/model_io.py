"""Loading base models and finding their FFN blocks (torch is imported by the functions that need it)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pruning import PruneError


def resolve_base(base: str | Path, models_dir: Path | None = None) -> Path:
    """A base is a local HF model directory, or a model name under `models_dir`."""
    p = Path(base).expanduser()
    if p.is_dir():
        candidate = p
    elif models_dir is not None and (Path(models_dir) / str(base)).is_dir():
        candidate = Path(models_dir) / str(base)
    elif models_dir is not None and p.is_absolute() and (Path(models_dir) / p.name).is_dir():
        candidate = Path(models_dir) / p.name  # a path on another host (a record's base): this host's copy
    else:
        raise PruneError(
            f"base model {base!r} not found; run `npc models pull` to install the default "
            "model, or set NPC_BASE_MODEL to a local Hugging Face model directory"
        )
    if not (candidate / "config.json").is_file():
        raise PruneError(f"{candidate} is not a Hugging Face model directory (no config.json)")
    return candidate


def load_model(path: Path, dtype=None, device: str = "cpu"):
    """(model, tokenizer) of a HF model directory, in `dtype` (default float32), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32 if dtype is None else dtype)
    model.to(device).eval()
    ffn_blocks(model)  # fail early on an unsupported architecture
    return model, tok


def ffn_blocks(model) -> list:
    """The gated MLP of every decoder layer (Llama, Mistral, Qwen2, ... layout)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise PruneError("base model has no model.layers: not a decoder-only HF model we can prune")
    blocks = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise PruneError(
                f"layer {i} has no gated FFN (mlp.gate_proj/up_proj/down_proj): "
                "unsupported base architecture"
            )
        blocks.append(mlp)
    return blocks


def intermediate_sizes(model) -> list[int]:
    return [b.gate_proj.out_features for b in ffn_blocks(model)]


def model_device(model):
    return next(model.parameters()).device


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
