"""Loading base models and finding their FFN blocks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pruning import PruneError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_sha256(model_dir: Path) -> str:
    """One digest over every weight file of a checkpoint (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise PruneError(f"no *.safetensors weights in {model_dir}")
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def resolve_base(base: str | Path, models_dir: Path | None = None) -> Path:
    """A base is a local HF model directory, or a model name under `models_dir`."""
    p = Path(base).expanduser()
    if p.is_dir():
        candidate = p
    elif models_dir is not None and (Path(models_dir) / str(base)).is_dir():
        candidate = Path(models_dir) / str(base)
    else:
        raise PruneError(
            f"base model {base!r} not found; run `npc models pull` to install the default "
            "model, or set NPC_BASE_MODEL to a local Hugging Face model directory"
        )
    if not (candidate / "config.json").is_file():
        raise PruneError(f"{candidate} is not a Hugging Face model directory (no config.json)")
    return candidate


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    model.to(device).eval()
    ffn_blocks(model)  # fail early on an unsupported architecture
    return model, tok


def ffn_blocks(model) -> list[torch.nn.Module]:
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


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
