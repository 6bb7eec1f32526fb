"""Persona-conditioned rewriting: a teacher answers each instruction in character.

The default teacher is the base model itself with the persona as the system prompt: in a vLLM
engine (`teacher_backend` "vllm", or "auto" from 64 answers up) or with transformers' batched
decoding (shared-prefix KV cache). An OpenAI-compatible teacher is optional (`teacher_url`,
`teacher_model`, key from env `NPC_TEACHER_API_KEY`). All of them live in `pruning.generate`.

Synthetic datasets are cached as JSONL, keyed by sha256 of everything that shapes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from pruning import PruneError
from pruning.files import write_atomic_text
from pruning.generate import vllm_engine
from pruning.generate.hf import generate_detailed
from pruning.generate.openai_api import openai_answers
from pruning.model_io import model_device


# -- the cached synthetic dataset ----------------------------------------------------


def dataset_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def dataset_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "synth" / f"{key}.jsonl"


def load_dataset(cache_dir: Path | None, key: str) -> list[dict] | None:
    if cache_dir is None:
        return None
    p = dataset_path(cache_dir, key)
    try:
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    rows = [r for r in rows if isinstance(r, dict) and "instruction" in r and "answer" in r]
    return rows or None


def save_dataset(cache_dir: Path | None, key: str, rows: list[dict]) -> Path | None:
    if cache_dir is None:
        return None
    try:
        p = write_atomic_text(dataset_path(cache_dir, key), "".join(json.dumps(r) + "\n" for r in rows))
    except OSError:
        return None  # a cache we cannot write is not an error
    return p


AUTO_VLLM_MIN = 64          # answers from which starting a vLLM engine (~20-30 s) pays off
TEACHER_KV_BYTES = 1 << 30  # the teacher engine's KV cache: a few hundred short answers at once


def resolve_backend(backend: str, model, n_instructions: int) -> str:
    """`auto`: vLLM when it is usable, the base is a local directory and there are enough
    answers to amortise the engine start; else transformers (`hf`)."""
    if backend not in ("auto", "hf", "vllm"):
        raise PruneError(f"unknown teacher_backend {backend!r}; choose auto, hf or vllm")
    if backend != "auto":
        return backend
    path = getattr(model.config, "_name_or_path", "")
    local = bool(path) and Path(path).is_dir()
    use = n_instructions >= AUTO_VLLM_MIN and local and model_device(model).type == "cpu" and vllm_engine.available()
    return "vllm" if use else "hf"


def rewrite(model, tok, system: str | None, instructions: list[str], *, max_new_tokens: int = 96,
            batch_size: int = 16, temperature: float = 0.0, seed: int = 0, teacher_url: str | None = None,
            teacher_model: str | None = None, backend: str = "hf", keep_engine: bool = True,
            samples: int = 1, sample_temperature: float = 0.8,
            progress: Callable[[float], None] = lambda f: None) -> list[dict]:
    """Rows {instruction, answer, finished}: the teacher's persona-conditioned answers.

    `backend` "vllm" runs the base model in a process-wide vLLM engine (worth it when one
    process prunes many personas); "hf" (default) batches transformers' generate, which for
    one persona's few dozen answers is faster than starting an engine (~20 s here); "auto" picks
    (`resolve_backend`). With ``keep_engine=False`` an engine started here is stopped after.
    ``samples`` > 1 adds that many answers per instruction in all: the first at `temperature`, the
    others sampled at `sample_temperature` with seeds seed+1, ... (rows marked ``sample``)."""
    runs = [(temperature, seed)] + [(sample_temperature, seed + j) for j in range(1, samples)]
    started = False
    if backend == "vllm" and not teacher_url:
        path = getattr(model.config, "_name_or_path", "")
        if not path or not Path(path).is_dir():
            raise PruneError("teacher_backend vllm needs a base model loaded from a local directory")
        started = not vllm_engine.running(path)

        def gen(temp, sd, _f):
            return vllm_engine.answers(path, system, instructions, max_new_tokens, temperature=temp, seed=sd,
                                       kv_cache_bytes=TEACHER_KV_BYTES)
    elif teacher_url:
        if not teacher_model:
            raise PruneError("teacher_url needs teacher_model")

        def gen(temp, sd, _f):
            return openai_answers(system, instructions, max_new_tokens, url=teacher_url, model=teacher_model,
                                  temperature=temp, seed=sd)
    else:
        def gen(temp, sd, f):
            return generate_detailed(model, tok, system, instructions, max_new_tokens, batch_size=batch_size,
                                     temperature=temp, seed=sd, progress=f)
    rows = []
    try:
        for j, (temp, sd) in enumerate(runs):
            pairs = gen(temp, sd, lambda f, j=j: progress((j + f) / len(runs)))
            rows += [{"instruction": q, "answer": a, "finished": f, **({"sample": j} if j else {})}
                     for q, (a, f) in zip(instructions, pairs) if a]
            progress((j + 1) / len(runs))
    finally:
        if started and not keep_engine:  # a one-off teacher gives its memory back
            vllm_engine.release(getattr(model.config, "_name_or_path", ""))
    return rows
