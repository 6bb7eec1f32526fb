"""A shared pruned core: one FFN mask learned on many personas' data at once (the paper's global
mask), exported as a physically smaller base that NPCs of the dense base are pruned *within*.

    core = build_core(dense_dir, 0.25, out_dir)      # learn (or take shipped indices), export
    info = read_core(core)                           # None for an ordinary base

Why: in a shared decode batch every token pays the union of the channels its batch's NPCs keep,
and NPCs with different masks keep nearly all of them. Channels that *no* NPC keeps are what a
shared engine can stop paying for, so the core drops them for every NPC, and each NPC's own mask
selects within what is left (its total sparsity s >= the core's c).

A core directory is a base like any other (config, safetensors, tokenizer) whose manifest has a
`core` entry: the dense base (path, name, sha256) and the core's kept channels in the dense base's
indexing. An NPC pruned within a core learns on the dense model (the dense model stays the
teacher and the KL target) with every channel outside the core forbidden; its manifest's compact
form then indexes the core, so a mixed engine running the core serves it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pruning import PruneError
from pruning.manifest import Manifest, checkpoint_sha256

SHIPPED = Path(__file__).parent / "data" / "cores"


def core_name(dense_name: str, sparsity: float) -> str:
    return f"{dense_name}-core{round(sparsity * 100)}"


@dataclass(frozen=True)
class CoreInfo:
    core_dir: Path
    sha256: str               # the core's own weights
    sparsity: float           # of the dense FFN
    dense_dir: Path           # where the dense base is on this host
    dense_sha256: str
    kept: tuple               # per layer, sorted dense channel indices the core keeps


@lru_cache(maxsize=32)
def _read(core_dir: str, stamp: tuple) -> CoreInfo | None:
    d = Path(core_dir)
    try:
        m = Manifest.read(d)
    except Exception:
        return None
    c = m.get("core")
    if not isinstance(c, dict):
        return None
    dense = _find_dense(d, c)
    return CoreInfo(d, checkpoint_sha256(d), float(m.sparsity), dense, c["dense_sha256"],
                    tuple(tuple(int(i) for i in row) for row in m.kept_indices))


def _find_dense(core_dir: Path, c: dict) -> Path:
    """The dense base the core was cut from: where it was built, else beside the core (another host
    has its own models dir), checked by sha256."""
    for p in (Path(c.get("dense_base", "")), core_dir.parent / c.get("dense_name", "")):
        if p.is_dir() and list(p.glob("*.safetensors")) and checkpoint_sha256(p) == c["dense_sha256"]:
            return p
    raise PruneError(f"core {core_dir} needs its dense base {c.get('dense_name')!r} (sha256 "
                     f"{c['dense_sha256'][:12]}), which is not on this host")


def read_core(base_dir: str | Path) -> CoreInfo | None:
    """The core a base directory is, or None for an ordinary base (memoised per on-disk state)."""
    d = Path(base_dir)
    m = d / "manifest.json"
    if not m.is_file():
        return None
    files = sorted(d.glob("*.safetensors"))
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in [m, *files])
    return _read(str(d.resolve()), stamp)


def dense_of(base_dir: str | Path) -> Path:
    """The dense model behind a base: itself, or a core's dense base."""
    info = read_core(base_dir)
    return Path(base_dir) if info is None else info.dense_dir


def allowed_masks(info: CoreInfo, size: int):
    """(L, C) bool: True where the core keeps the dense channel."""
    import torch

    allowed = torch.zeros(len(info.kept), size, dtype=torch.bool)
    for i, row in enumerate(info.kept):
        allowed[i, list(row)] = True
    return allowed


def inside(scores: list, allowed) -> list:
    """Per-layer scores with every channel outside the core at -inf: any top-k stays inside it."""
    return [s.float().masked_fill(~a, float("-inf")) for s, a in zip(scores, allowed)]


def to_core_indexing(kept: list, info: CoreInfo) -> list[list[int]]:
    """Dense channel indices (a subset of the core's, per layer) -> positions in the core."""
    out = []
    for layer, (row, core_row) in enumerate(zip(kept, info.kept)):
        pos = {ch: j for j, ch in enumerate(core_row)}
        missing = [int(ch) for ch in row if int(ch) not in pos]
        if missing:
            raise PruneError(f"layer {layer}: channels {missing[:5]} are outside the core")
        out.append([pos[int(ch)] for ch in row])
    return out


# -- building a core ---------------------------------------------------------------------


def shipped_kept(dense_sha: str, sparsity: float) -> list[list[int]] | None:
    p = SHIPPED / f"{dense_sha[:16]}-c{round(sparsity * 100)}.json"
    return json.loads(p.read_text())["kept_indices"] if p.is_file() else None


def learn_core(model, tok, sparsity: float, personas: list[str], *, per_persona: int, options: dict,
               cache_dir: Path | None, seed: int = 0, log=print) -> tuple[list, dict]:
    """One persona-pruner mask on `per_persona` synthetic examples of each persona, learned
    together (mask only: a core's channels keep their dense weights, so NPC scales learned on the
    dense model apply to the core unchanged)."""
    from dataclasses import replace

    from pruning.checkpoint import keep_count, select_kept
    from pruning.methods.persona_pruner.data import persona_examples
    from pruning.methods.persona_pruner.masklearn import learn_scores
    from pruning.methods.persona_pruner.precision import compute_dtype, in_precision
    from pruning.methods.registry import PruneContext
    from pruning.model_io import model_device
    from pruning.options import learn_config, resolve_options

    t0 = time.time()
    rng = random.Random(seed)
    examples = []
    opts = resolve_options(options)
    for i, persona in enumerate(personas):
        ctx = PruneContext(persona=persona, sparsity=sparsity, seed=seed, options=dict(options), cache_dir=cache_dir)
        with persona_examples(model, tok, ctx) as (_, ex, _, _):
            examples += rng.sample(ex, min(per_persona, len(ex)))
        log(f"core: persona {i + 1}/{len(personas)}: {len(examples)} examples ({time.time() - t0:.0f} s)")
    rng.shuffle(examples)
    k = keep_count(model.config.intermediate_size, sparsity)
    cfg = replace(learn_config(opts, seed), scale_steps=0)
    with in_precision(model, compute_dtype(opts["compute_dtype"], model_device(model))) as work:
        res = learn_scores(work, tok, examples, k, cfg)
    info = {"personas": len(personas), "examples": len(examples), "profile": opts["profile"],
            "steps": cfg.steps, "seconds": round(time.time() - t0, 1)}
    return [row.tolist() for row in select_kept(res.scores, k)], info


def build_core(dense_dir: Path, sparsity: float, out_dir: Path, *, kept: list[list[int]] | None = None,
               learn: bool = False, personas: list[str] | None = None, per_persona: int = 32,
               options: dict | None = None, cache_dir: Path | None = None, seed: int = 0, log=print) -> Path:
    """Export the core of `dense_dir` at `sparsity` to `out_dir`. Its channels: `kept` if given, else
    the indices shipped for this base (unless `learn`), else learned on `personas` (default: the
    shipped reference personas)."""
    import torch

    from pruning.checkpoint import export_checkpoint, keep_count
    from pruning.datasets import load_reference_personas
    from pruning.model_io import load_model

    if read_core(dense_dir) is not None:
        raise PruneError(f"{dense_dir} is a core already; build a core from a dense base")
    if not 0 < sparsity < 1:
        raise PruneError(f"core sparsity must be in (0, 1), got {sparsity}")
    dense_sha = checkpoint_sha256(dense_dir)
    source = "given"
    if kept is None and not learn:
        kept, source = shipped_kept(dense_sha, sparsity), "shipped"
    model, tok = load_model(Path(dense_dir), dtype=torch.float32)
    info: dict = {}
    if kept is None:
        source = "learned"
        kept, info = learn_core(model, tok, sparsity, personas or load_reference_personas(),
                                per_persona=per_persona, options=dict(options or {"profile": "default"}),
                                cache_dir=cache_dir, seed=seed, log=log)
    k = keep_count(model.config.intermediate_size, sparsity)
    if len(kept) != model.config.num_hidden_layers or any(len(set(r)) != k for r in kept):
        raise PruneError(f"a core at {sparsity} keeps {k} distinct channels in each of "
                         f"{model.config.num_hidden_layers} layers")
    kept_t = [torch.tensor(sorted(r), dtype=torch.long) for r in kept]
    core = {"dense_base": str(Path(dense_dir).resolve()), "dense_name": Path(dense_dir).name,
            "dense_sha256": dense_sha, "source": source, **info}
    return export_checkpoint(model, tok, kept_t, Path(out_dir), base_dir=Path(dense_dir), method="core",
                             sparsity=sparsity, persona="", extra={"core": core}, dtype=torch.bfloat16)
