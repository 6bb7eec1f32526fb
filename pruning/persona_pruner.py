"""Persona-Pruner: filter persona-sensitive instructions, rewrite them in character, learn the mask.

    scores = persona_pruner(model, tok, ctx)     # registered as method "persona-pruner"

1. sensitivity  (pruning/sensitivity.py): the top-N instructions of the pool whose middle-layer
   representation moves most with the persona vs reference personas;
2. rewriting    (pruning/synth.py): the teacher (default: the base model) answers them with the
   persona as the system prompt; the set is cached as JSONL keyed by everything that shapes it;
3. mask learning (pruning/masklearn.py): a per-layer top-k channel mask trained through a
   straight-through estimator to keep the masked model's answers close to the teacher's, then
   (``scale_steps``) a scale per kept channel learned on the same loss with the mask fixed.

The returned scores are the learned real-valued scores, so export's per-layer top-k is the
learned mask; the scales go back through ``ctx.channel_scales`` and export folds them into
down_proj. Options come from `ctx.options` on top of a profile (`fast`, `default`,
`thorough`); see `OPTIONS`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch

from pruning import PruneError, check_number
from pruning.batching import make_examples, prompt_ids, shared_prompt_len
from pruning.datasets import calibration_prompts, load_instructions, load_reference_personas
from pruning.masklearn import MaskLearnConfig, config_for, dense_pass, learn_scores, profile
from pruning.methods import PruneContext, register
from pruning.model_io import checkpoint_sha256, ffn_blocks
from pruning.sensitivity import (default_band, reference_stats, reference_stats_path, sampled_inputs,
                                 select_instructions)
from pruning.synth import dataset_key, load_dataset, resolve_backend, rewrite, save_dataset

DEFAULT_PROFILE = "default"
# the methods that build (or reuse) the persona's synthetic set and so take the options below
DATA_METHODS = ("persona-pruner", "activation-persona")
DEFAULT_SPARSITY = 0.25
QUESTION_TOKENS = 40  # a pool instruction's typical length, for the data budget
LEARN_KEYS = {f.name for f in fields(MaskLearnConfig)} - {"seed"}
# every option a caller may set in ctx.options (profile values are the defaults)
OPTIONS = {
    "profile", "n_instructions", "pool_size", "n_references", "band", "max_new_tokens",
    "teacher_url", "teacher_model", "teacher_temperature", "gen_batch_size", "sens_batch_size",
    "pool_path", "references_path", "pool_calibration", "teacher_backend", "center", "n_anchor", "compute_dtype", "use_cache", "log_every", "relative",
    "data_tokens",
    *LEARN_KEYS,
}


def default_cache_dir() -> Path:
    if os.environ.get("NPC_CACHE_DIR"):
        return Path(os.environ["NPC_CACHE_DIR"]).expanduser()
    data = os.environ.get("NPC_DATA_DIR") or "~/.local/share/npc"
    return Path(data).expanduser() / "cache"


_SHA_MEMO: dict = {}


def base_identity(model) -> str:
    """sha256 of the base checkpoint the model was loaded from (its path when unknown)."""
    path = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if path and p.is_dir() else []
    if not files:
        return f"path:{path}|layers:{len(ffn_blocks(model))}"
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(p.resolve()), stamp)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = checkpoint_sha256(p)
    return _SHA_MEMO[key]


def _bf16_fast(device: torch.device) -> bool:
    if device.type != "cpu":
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except Exception:
        return False


def compute_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """`auto`: bfloat16 where the hardware runs it fast (the shipped bases are bf16 anyway)."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if _bf16_fast(device) else None
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                "fp32": torch.float32, "float16": torch.float16}[name]
    except KeyError:
        raise PruneError(f"unknown compute_dtype {name!r}") from None


@contextmanager
def in_precision(model, dtype: torch.dtype | None):
    """The model in `dtype`: cast in place when the round trip is lossless, else on a copy."""
    orig = next(model.parameters()).dtype
    if dtype is None or dtype == orig:
        yield model
        return
    with torch.no_grad():
        lossless = all(torch.equal(p.to(dtype).to(orig), p) for p in model.parameters())
    if lossless:
        # the parameters round-trip exactly, floating buffers need not (rotary inv_freq): kept aside
        buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
        model.to(dtype)
        try:
            yield model
        finally:
            model.to(orig)
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
    else:
        work = copy.deepcopy(model).to(dtype)
        try:
            yield work
        finally:
            del work


def resolve_options(ctx: PruneContext) -> dict:
    opts = dict(ctx.options or {})
    unknown = set(opts) - OPTIONS
    if unknown:
        raise PruneError(f"unknown persona-pruner options: {', '.join(sorted(unknown))}")
    prof = profile(opts.get("profile") or DEFAULT_PROFILE)
    learn = prof.pop("learn")
    out = {"profile": opts.get("profile") or DEFAULT_PROFILE, "band": None, "teacher_url": None,
           "teacher_model": None, "teacher_temperature": 0.0, "gen_batch_size": 16, "sens_batch_size": 64,
           "pool_path": None, "references_path": None, "pool_calibration": True, "center": True, "n_anchor": 0,
           # the persona's own topics, not the questions every persona moves (docs/quality_experiments.md)
           "relative": True,
           "compute_dtype": "auto", "use_cache": True, "teacher_backend": "auto",
           "log_every": 0, **prof, **learn}
    out.update({k: v for k, v in opts.items() if v is not None or k in ("pool_size", "n_references")})
    _check_counts(out)
    return out


def learn_config(opts: dict, seed: int = 0) -> MaskLearnConfig:
    """The mask-learning config of resolved options: the profile's, with the caller's knobs."""
    return config_for(opts["profile"], **{key: opts[key] for key in LEARN_KEYS if key in opts}, seed=seed)


# the data options a caller may set, and their bounds (None allowed where the profile uses it)
_COUNTS = {"n_instructions": (0, 4096), "pool_size": (1, 100_000), "n_references": (1, 1000),
           "max_new_tokens": (1, 1024), "gen_batch_size": (1, 256), "sens_batch_size": (1, 1024),
           "n_anchor": (0, 1024), "data_tokens": (1000, 100_000_000)}


def _check_counts(opts: dict) -> None:
    for name, (lo, hi) in _COUNTS.items():
        if opts.get(name) is not None or name not in ("pool_size", "n_references", "data_tokens"):
            check_number(name, opts.get(name), lo, hi, integer=True)
    check_number("teacher_temperature", opts.get("teacher_temperature"), 0, 2)


def data_budget(tok, system: str, opts: dict) -> int:
    """How many instructions to answer: `n_instructions`, unless the set would pass `data_tokens`
    (a persona prompt plus question and answer per instruction). Every later stage (the teacher,
    the dense pass, the Fisher) runs the whole prompt per example, so a long persona prompt
    would otherwise stretch the prune time with it; never below 64 instructions."""
    n, budget = opts["n_instructions"], opts.get("data_tokens")
    if not budget or n <= 64:
        return n
    per = len(prompt_ids(tok, "", system)) + QUESTION_TOKENS + opts["max_new_tokens"]
    return max(64, min(n, budget // per))


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\x00".join(items).encode()).hexdigest()


def _filter_inputs(model, opts: dict) -> tuple[list[str], list[str], list[str], tuple[int, int]]:
    """(pool, anchors, reference personas, band) of resolved options, before any subsampling."""
    pool = load_instructions(opts["pool_path"])
    anchors = calibration_prompts(opts["n_anchor"]) if opts["n_anchor"] else []
    if opts["pool_calibration"] and not opts["pool_path"]:
        seen = set(pool)
        pool += [q for q in calibration_prompts() if q not in seen]
    pool = [q for q in pool if q not in set(anchors)]
    refs = load_reference_personas(opts["references_path"])
    band = tuple(opts["band"]) if opts["band"] else default_band(len(ffn_blocks(model)))
    return pool, anchors, refs, band


def warm_reference_states(model, tok, options: dict | None = None, *, seed: int = 0,
                          cache_dir: Path | None = None, progress=lambda f: None) -> bool:
    """Compute and cache the reference personas' hidden states that the filter of `options`
    (default: the default profile) measures with `seed`. They do not depend on the persona, so an
    install computes them once and a machine's first prune does not (1.5-3 min on 2 cores).
    True when they were computed now, False when the cache already held them."""
    opts = resolve_options(PruneContext(persona="-", options=dict(options or {})))
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    base_id = base_identity(model)
    pool, _anchors, refs, band = _filter_inputs(model, opts)
    pool, refs = sampled_inputs(pool, refs, opts["pool_size"], opts["n_references"], seed)
    with in_precision(model, compute_dtype(opts["compute_dtype"], next(model.parameters()).device)) as work:
        if reference_stats_path(work, pool, refs, band, cache_dir, base_id).is_file():
            return False
        reference_stats(work, tok, pool, refs, band=band, batch_size=opts["sens_batch_size"],
                        cache_dir=cache_dir, base_id=base_id, progress=progress)
    return True


def build_dataset(model, tok, ctx: PruneContext, opts: dict, base_id: str, cache_dir: Path | None,
                  progress=lambda f: None) -> tuple[list[dict], dict]:
    """Filtered + rewritten (instruction, answer) rows for the persona, from the cache when present."""
    system = ctx.chat_system
    pool, anchors, refs, band = _filter_inputs(model, opts)
    dtype = next(model.parameters()).dtype
    n = data_budget(tok, system, opts)
    backend = "openai" if opts["teacher_url"] else resolve_backend(opts["teacher_backend"], model, n + len(anchors))
    key = dataset_key(v=1, system=system, persona=ctx.persona, base=base_id, pool=_digest(pool),
                      refs=_digest(refs), n=n, pool_size=opts["pool_size"],
                      n_refs=opts["n_references"], band=list(band), seed=ctx.seed, center=opts["center"],
                      **({"relative": True} if opts["relative"] else {}),  # plain keys stay as they were
                      anchors=_digest(anchors), max_new_tokens=opts["max_new_tokens"], teacher_url=opts["teacher_url"],
                      teacher_model=opts["teacher_model"], temperature=opts["teacher_temperature"],
                      teacher_backend=opts["teacher_backend"] if opts["teacher_url"] else backend,
                      dtype=str(dtype))
    info = {"dataset_key": key, "n_instructions": n}
    rows = load_dataset(cache_dir, key) if cache_dir is not None else None
    if rows is not None:
        info["dataset_cached"] = True
        progress(1.0)
        return rows, info
    t0 = time.time()
    ctx.stage("filtering")
    picked = [] if n <= 0 else select_instructions(
        model, tok, system, n, pool=pool, pool_size=opts["pool_size"], references=refs,
        n_references=opts["n_references"], band=band, seed=ctx.seed, center=opts["center"],
        batch_size=opts["sens_batch_size"], cache_dir=cache_dir, base_id=base_id, relative=bool(opts["relative"]),
        progress=lambda f: progress(0.3 * f))
    t1 = time.time()
    ctx.stage("rewriting")
    rows = rewrite(model, tok, system, [q for q, _ in picked] + anchors, max_new_tokens=opts["max_new_tokens"],
                   batch_size=opts["gen_batch_size"], temperature=opts["teacher_temperature"], seed=ctx.seed,
                   teacher_url=opts["teacher_url"], teacher_model=opts["teacher_model"],
                   backend=backend, keep_engine=opts["teacher_backend"] != "auto", progress=lambda f: progress(0.3 + 0.7 * f))
    div = dict(picked)
    for r in rows:
        if r["instruction"] in div:
            r["divergence"] = round(div[r["instruction"]], 6)
        else:
            r["anchor"] = True
    if not rows:
        raise PruneError("the teacher produced no answers for the selected instructions")
    info.update(dataset_cached=False, teacher_backend=backend, filter_s=round(t1 - t0, 2), rewrite_s=round(time.time() - t1, 2))
    if opts["use_cache"]:
        p = save_dataset(cache_dir, key, rows)
        if p is not None:
            info["dataset_path"] = str(p)
    return rows, info


@contextmanager
def persona_examples(model, tok, ctx: PruneContext):
    """(work model, training examples, resolved options, data info): the persona's synthetic set
    (built, or read from the cache) with the model in the method's working precision."""
    opts = resolve_options(ctx)
    max_length = learn_config(opts).max_length  # checks the learning options before any work
    cache_dir = (Path(ctx.cache_dir) if ctx.cache_dir else default_cache_dir()) if opts["use_cache"] else None
    base_id = ctx.base_id or base_identity(model)
    device = next(model.parameters()).device
    with in_precision(model, compute_dtype(opts["compute_dtype"], device)) as work:
        rows, info = build_dataset(work, tok, ctx, opts, base_id, cache_dir,
                                   progress=lambda f: ctx.progress(0.4 * f))
        examples = make_examples(tok, ctx.chat_system, [r["instruction"] for r in rows],
                                 [r["answer"] for r in rows], [bool(r.get("finished", True)) for r in rows],
                                 max_length=max_length)
        yield work, examples, opts, info


def persona_pruner(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    """Learned per-channel scores (top-k per layer = the learned mask)."""
    from pruning.export import keep_count

    t0 = time.time()
    blocks = ffn_blocks(model)
    sizes = {b.down_proj.in_features for b in blocks}
    if len(sizes) != 1:
        raise PruneError("persona-pruner needs the same FFN size in every layer")
    k = keep_count(sizes.pop(), ctx.sparsity if ctx.sparsity is not None else DEFAULT_SPARSITY)
    with persona_examples(model, tok, ctx) as (work, examples, opts, info):
        cfg = learn_config(opts, ctx.seed)
        ctx.stage("learning")
        res = learn_scores(work, tok, examples, k, cfg, progress=lambda f: ctx.progress(0.4 + 0.6 * f),
                           log_every=int(opts.get("log_every") or 0))
    h = res.history
    info.update(profile=opts["profile"], variant=cfg.variant, steps=cfg.steps, examples=len(examples),
                learn_s=round(res.seconds, 2), total_s=round(time.time() - t0, 2),
                loss_first=round(h[0]["loss"], 4) if h else None, loss_last=round(h[-1]["loss"], 4) if h else None)
    if res.scales is not None:
        ctx.channel_scales = [x.float().cpu() for x in res.scales]
        info["scale_steps"] = cfg.scale_steps
    ctx.info.update({"persona_pruner": info})
    ctx.progress(1.0)
    return [s.float().cpu() for s in res.scores]


@register("activation-persona")
def activation_persona(model, tok, ctx: PruneContext) -> list[torch.Tensor]:
    """The ablation: Wanda/FLAP-style activation scores (activation norm x down_proj column norm)
    measured on persona-pruner's own synthetic data (same options, same cache): the data
    without the learning."""
    t0 = time.time()
    with persona_examples(model, tok, ctx) as (work, examples, opts, info):
        ctx.stage("scoring")
        P = shared_prompt_len(examples)
        _, acts = dense_pass(work, tok, examples, P, learn_config(opts).batch_size, 0,
                             progress=lambda f: ctx.progress(0.4 + 0.6 * f))
        cols = [b.down_proj.weight.detach().float().norm(dim=0).cpu() for b in ffn_blocks(work)]
    info.update(profile=opts["profile"], examples=len(examples), total_s=round(time.time() - t0, 2))
    ctx.info.update({"activation_persona": info})
    ctx.progress(1.0)
    return [a * c for a, c in zip(acts, cols)]


register("persona-pruner")(persona_pruner)
