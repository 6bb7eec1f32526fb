"""Persona-Pruner's training data: the persona-sensitive instructions of the pool, answered in
character by the teacher, cached (`build_dataset`), as teacher-forced examples (`persona_examples`)."""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path

from pruning import PruneError
from pruning.chat import prompt_ids
from pruning.datasets import calibration_prompts, load_instructions, load_reference_personas
from pruning.manifest import checkpoint_sha256
from pruning.methods.persona_pruner.precision import compute_dtype, in_precision
from pruning.methods.persona_pruner.sensitivity import (default_band, reference_stats, reference_stats_path,
                                                        sampled_inputs, select_instructions)
from pruning.methods.persona_pruner.teacher import dataset_key, load_dataset, resolve_backend, rewrite, save_dataset
from pruning.methods.registry import PruneContext
from pruning.model_io import ffn_blocks, model_device
from pruning.options import learn_config, resolve_options
from pruning.prefix_forward import make_examples

QUESTION_TOKENS = 40  # a pool instruction's typical length, for the data budget


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


def data_budget(tok, system: str, opts: dict) -> int:
    """How many instructions to answer: `n_instructions`, unless the set would pass `data_tokens`
    (a persona prompt plus question and answer per instruction). Every later stage (the teacher,
    the dense pass, the Fisher) runs the whole prompt per example, so a long persona prompt
    would otherwise stretch the prune time with it; never below 64 instructions."""
    n, budget = opts["n_instructions"], opts.get("data_tokens")
    if not budget or n <= 64:
        return n
    per = (len(prompt_ids(tok, "", system)) + QUESTION_TOKENS + opts["max_new_tokens"]) * opts.get("samples", 1)
    return max(64, min(n, budget // per))


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\x00".join(items).encode()).hexdigest()


def _filter_inputs(model, opts: dict) -> tuple[list[str], list[str], list[str], tuple[int, int]]:
    """(pool, anchors, reference personas, band) of resolved options, before any subsampling."""
    pool = load_instructions(opts["pool_path"])
    anchors = calibration_prompts(opts["n_anchor"]) if opts["n_anchor"] else []
    anchors += [q for q in opts.get("extra_instructions") or [] if q not in set(anchors)]
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
    opts = resolve_options(options)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    base_id = base_identity(model)
    pool, _anchors, refs, band = _filter_inputs(model, opts)
    pool, refs = sampled_inputs(pool, refs, opts["pool_size"], opts["n_references"], seed)
    with in_precision(model, compute_dtype(opts["compute_dtype"], model_device(model))) as work:
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
    backend = "openai" if opts["teacher_url"] else resolve_backend(opts["teacher_backend"], model,
                                                                   (n + len(anchors)) * opts["samples"])
    key = dataset_key(v=1, system=system, persona=ctx.persona, base=base_id, pool=_digest(pool),
                      refs=_digest(refs), n=n, pool_size=opts["pool_size"],
                      n_refs=opts["n_references"], band=list(band), seed=ctx.seed, center=opts["center"],
                      **({"relative": True} if opts["relative"] else {}),  # plain keys stay as they were
                      anchors=_digest(anchors), max_new_tokens=opts["max_new_tokens"], teacher_url=opts["teacher_url"],
                      teacher_model=opts["teacher_model"], temperature=opts["teacher_temperature"],
                      teacher_backend=opts["teacher_backend"] if opts["teacher_url"] else backend,
                      dtype=str(dtype),
                      **({"samples": opts["samples"], "sample_temperature": opts["sample_temperature"]}
                         if opts["samples"] > 1 else {}))
    info = {"dataset_key": key, "n_instructions": n}
    rows = load_dataset(cache_dir, key) if cache_dir is not None else None
    if rows is not None:
        info["dataset_cached"] = True
        progress(1.0)
        return rows, info
    t0 = time.time()
    ctx.stage("filtering")
    # the target under its chat-time prompt against bare reference descriptions: measuring the
    # target bare too picked data that kept less of the persona (docs/quality_experiments.md)
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
                   backend=backend, keep_engine=opts["teacher_backend"] != "auto", samples=opts["samples"],
                   sample_temperature=opts["sample_temperature"], progress=lambda f: progress(0.3 + 0.7 * f))
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
    opts = resolve_options(ctx.options)
    max_length = learn_config(opts).max_length  # checks the learning options before any work
    cache_dir = (Path(ctx.cache_dir) if ctx.cache_dir else default_cache_dir()) if opts["use_cache"] else None
    base_id = ctx.base_id or base_identity(model)
    with in_precision(model, compute_dtype(opts["compute_dtype"], model_device(model))) as work:
        rows, info = build_dataset(work, tok, ctx, opts, base_id, cache_dir,
                                   progress=lambda f: ctx.progress(0.4 * f))
        yield work, rows_to_examples(tok, ctx.chat_system, rows, max_length), opts, info


def rows_to_examples(tok, system: str, rows: list[dict], max_length: int = 512) -> list:
    """The teacher-forced examples of synthetic rows under the persona's system prompt."""
    return make_examples(tok, system, [r["instruction"] for r in rows], [r["answer"] for r in rows],
                         [bool(r.get("finished", True)) for r in rows], max_length=max_length)
