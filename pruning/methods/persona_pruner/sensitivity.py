"""Persona-sensitivity filtering: which instructions make the persona matter?

For each instruction, the last prompt token's hidden state (averaged over a band of middle
layers) is computed with the target persona as the system prompt and with each reference
persona as the system prompt. An instruction whose representation moves with the persona
(divergence = 1 - mean_ref cos(h_target, h_ref) is high) is one where the persona changes
what the model is about to say; those are the instructions worth distilling.

By default the states are centred on the mean reference state first (see
`persona_divergence`). Cost: the system prompt is a shared prefix, run once per persona; only
the instruction tokens run per row, in length-sorted batches (right padded after the shared
prefix, attention-masked), and the forward stops after the band. The reference side does not
depend on the target persona and is cached on disk (`reference_stats`).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Callable

import torch

from pruning.chat import pad_id_of, prompt_ids
from pruning.datasets import load_instructions, load_reference_personas
from pruning.files import write_atomic_file
from pruning.model_io import model_device
from pruning.prefix_forward import common_prefix_len, expanded_cache, length_batches, suffix_inputs


class _Stop(Exception):
    pass


def default_band(n_layers: int) -> tuple[int, int]:
    """The middle third of the layers, [start, stop)."""
    return n_layers // 3, max(n_layers // 3 + 1, (2 * n_layers) // 3)


def _layers(model):
    return model.model.layers


@torch.no_grad()
def band_states(model, tok, system: str | None, instructions: list[str], *,
                band: tuple[int, int] | None = None, batch_size: int = 64, max_length: int = 256,
                progress: Callable[[float], None] = lambda f: None) -> torch.Tensor:
    """(N, H) float32: last-prompt-token hidden state averaged over layers [band)."""
    from transformers import DynamicCache

    layers = _layers(model)
    lo, hi = band or default_band(len(layers))
    dev = model_device(model)
    pad = pad_id_of(tok)
    seqs = [prompt_ids(tok, q, system) for q in instructions]
    P = common_prefix_len(seqs, limit=min(len(s) for s in seqs) - 1)
    # the system prompt is what is measured, so it is never cut (cutting every sequence to its last
    # `max_length` tokens lost the start of a long persona and, with it, the shared prefix: every
    # instruction then ran the whole prompt again); an overlong instruction keeps its end
    seqs = [s[:P] + s[P:][-max_length:] for s in seqs]
    out = torch.zeros(len(seqs), model.config.hidden_size)
    acc: dict = {}

    def hook(_m, _a, output, i):
        h = output[0] if isinstance(output, tuple) else output
        if acc.get("last") is not None:
            v = h[torch.arange(h.shape[0], device=h.device), acc["last"]].float()
            acc["sum"] = v if acc.get("sum") is None else acc["sum"] + v
        if i == hi - 1:
            raise _Stop

    handles = [layers[i].register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i in range(lo, hi)]
    try:
        # the shared prefix once, only as deep as the band needs
        kv = None
        if P > 0:
            cache = DynamicCache(config=model.config)
            acc["last"] = None
            try:
                model.model(input_ids=torch.tensor([seqs[0][:P]], device=dev), past_key_values=cache,
                            use_cache=True)
            except _Stop:
                pass
            kv = [(l.keys, l.values) if getattr(l, "is_initialized", False) else (None, None)
                  for l in cache.layers]
        batches = length_batches([len(s) for s in seqs], batch_size)
        for n, idx in enumerate(batches):
            sfx = [seqs[i][P:] for i in idx]
            ids, mask, pos = suffix_inputs(sfx, P, pad, dev)
            cache = expanded_cache(model, kv, len(idx))
            acc["last"] = torch.tensor([len(s) - 1 for s in sfx], device=dev)
            acc["sum"] = None
            try:
                model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=cache is not None)
            except _Stop:
                pass
            out[idx] = (acc["sum"] / (hi - lo)).cpu()
            progress((n + 1) / len(batches))
    finally:
        for h in handles:
            h.remove()
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def reference_stats_path(model, instructions: list[str], references: list[str], band, cache_dir: Path,
                         base_id: str) -> Path:
    """Where `reference_stats` caches its result for these inputs."""
    key = _digest({"v": 4, "base": base_id, "band": list(band), "refs": references,
                   "dtype": str(next(model.parameters()).dtype),
                   "pool": hashlib.sha256("\x00".join(instructions).encode()).hexdigest()})
    return Path(cache_dir) / "sensitivity" / f"refs-{key[:32]}.pt"


def reference_stats(model, tok, instructions: list[str], references: list[str], *, band=None,
                    batch_size: int = 64, cache_dir: Path | None = None, base_id: str | None = None,
                    progress: Callable[[float], None] = lambda f: None) -> dict:
    """What the divergence needs from the reference personas (independent of the target; cacheable):

    ``mu`` (H,): the mean band state over references and instructions;
    ``raw`` (N, H): per instruction, the mean over references of unit(h_ref);
    ``centred`` (N, H): the same of unit(h_ref - mu);
    ``ref_div`` (R, N) / ``ref_div_raw``: each reference's own (centred / raw) divergence from the
    others, the yardstick for how much a persona *usually* moves an instruction.
    """
    band = band or default_band(len(_layers(model)))
    path = None
    if cache_dir is not None and base_id:
        path = reference_stats_path(model, instructions, references, band, cache_dir, base_id)
        if path.is_file():
            try:
                t = torch.load(path, map_location="cpu", weights_only=True)
                if t["raw"].shape[0] == len(instructions):
                    progress(1.0)
                    return t
            except Exception:
                pass
    states = []
    for r, ref in enumerate(references):
        states.append(band_states(model, tok, ref, instructions, band=band, batch_size=batch_size,
                                  progress=lambda f, r=r: progress((r + f) / len(references))))
    H = torch.stack(states)  # (R, N, H)
    mu = H.mean((0, 1))
    out = {"mu": mu}
    for name, U in (("raw", _unit(H)), ("centred", _unit(H - mu))):
        mean = U.mean(0)
        R = U.shape[0]
        others = (R * mean - U) / max(R - 1, 1)  # leave-one-out mean of the other references
        out[name] = mean
        out["ref_div" if name == "centred" else "ref_div_raw"] = 1.0 - (U * others).sum(-1)
    if path is not None:
        try:
            write_atomic_file(path, lambda tmp: torch.save(out, tmp))
        except OSError:
            pass
    return out


def persona_divergence(model, tok, persona: str, instructions: list[str], references: list[str], *,
                       band=None, batch_size: int = 64, center: bool = True, cache_dir: Path | None = None,
                       base_id: str | None = None, relative: bool = False,
                       progress: Callable[[float], None] = lambda f: None) -> torch.Tensor:
    """(N,) divergence = 1 - mean_ref cos(h_target, h_ref) per instruction.

    With ``relative`` the divergence is given as a z-score against the references' own
    divergences on the same instruction: high where *this* persona moves the instruction more
    than personas usually do (its topics), not where every persona does (open, personal
    questions, which the plain divergence favours for every target alike).

    With ``center`` (default) both states are taken relative to the mean reference state:
    raw middle-layer states share a few huge coordinates, so raw cosines are all ~0.99 and
    mostly measure the instruction's length/type; centred ones measure the persona's shift.
    """
    refs = [r for r in references if r.strip() != persona.strip()] or references
    st = reference_stats(model, tok, instructions, refs, band=band, batch_size=batch_size,
                         cache_dir=cache_dir, base_id=base_id, progress=lambda f: progress(0.8 * f))
    h = band_states(model, tok, persona, instructions, band=band, batch_size=batch_size,
                    progress=lambda f: progress(0.8 + 0.2 * f))
    if center:
        div, ref = 1.0 - (_unit(h - st["mu"]) * st["centred"]).sum(-1), st["ref_div"]
    else:
        div, ref = 1.0 - (_unit(h) * st["raw"]).sum(-1), st["ref_div_raw"]
    if not relative or ref.shape[0] < 2:
        return div
    return (div - ref.mean(0)) / ref.std(0).clamp_min(1e-6)


def sampled_inputs(pool: list[str] | None, references: list[str] | None, pool_size: int | None,
                   n_references: int | None, seed: int) -> tuple[list[str], list[str]]:
    """(instructions, reference personas) the filter measures: seeded subsamples of the pool and of
    the references (the shipped ones when None)."""
    pool = list(pool if pool is not None else load_instructions())
    refs = list(references if references is not None else load_reference_personas())
    if pool_size and pool_size < len(pool):
        pool = random.Random(seed).sample(pool, pool_size)
    if n_references and n_references < len(refs):
        refs = random.Random(seed + 1).sample(refs, n_references)
    return pool, refs


def select_instructions(model, tok, persona: str, n: int, *, pool: list[str] | None = None,
                        pool_size: int | None = None, references: list[str] | None = None,
                        n_references: int | None = None, band=None, seed: int = 0, batch_size: int = 64,
                        center: bool = True, cache_dir: Path | None = None, base_id: str | None = None,
                        relative: bool = False, progress: Callable[[float], None] = lambda f: None) -> list[tuple[str, float]]:
    """The top-`n` persona-sensitive instructions of the pool, (instruction, divergence), best first.

    `pool_size` subsamples the pool (seeded) and `n_references` the reference personas, for speed.
    """
    pool, refs = sampled_inputs(pool, references, pool_size, n_references, seed)
    div = persona_divergence(model, tok, persona, pool, refs, band=band, batch_size=batch_size, center=center,
                             cache_dir=cache_dir, base_id=base_id, relative=relative, progress=progress)
    order = sorted(range(len(pool)), key=lambda i: (-float(div[i]), i))
    return [(pool[i], float(div[i])) for i in order[:n]]
