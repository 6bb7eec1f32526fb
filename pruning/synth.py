"""Persona-conditioned rewriting: a teacher answers each instruction in character.

The default teacher is the base model itself with the persona as the system prompt
(batched greedy decoding, shared-prefix KV cache). `generate_answers` is the one function a
faster backend (vLLM) would replace. An OpenAI-compatible teacher is optional
(`teacher_url`, `teacher_model`, key from env `NPC_TEACHER_API_KEY`).

Synthetic datasets are cached as JSONL, keyed by sha256 of everything that shapes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from pruning import PruneError
from pruning.batching import common_prefix_len, end_of_turn_id, model_device, pad_id_of, prompt_ids

TEACHER_KEY_ENV = "NPC_TEACHER_API_KEY"


@torch.no_grad()
def generate_detailed(model, tok, system: str | None, questions: list[str], max_new_tokens: int = 96, *,
                      batch_size: int = 16, temperature: float = 0.0, seed: int = 0, max_prompt: int = 512,
                      progress: Callable[[float], None] = lambda f: None) -> list[tuple[str, bool]]:
    """(answer, finished) per question; finished = ended with end-of-turn within the budget.

    Rows are grouped by prompt length; the shared system prefix is run once and its KV cache
    reused (left padding sits between the prefix and each question; the attention mask and
    mask-derived position ids keep every row exact).
    """
    seqs = [prompt_ids(tok, q, system)[-max_prompt:] for q in questions]
    return generate_ids(model, tok, seqs, max_new_tokens, batch_size=batch_size, temperature=temperature,
                        seed=seed, progress=progress)


@torch.no_grad()
def generate_ids(model, tok, seqs: list[list[int]], max_new_tokens: int, *, batch_size: int = 16,
                 temperature: float = 0.0, seed: int = 0,
                 progress: Callable[[float], None] = lambda f: None) -> list[tuple[str, bool]]:
    """(text, finished) continuing each tokenised prompt (a chat ending in the assistant header)."""
    from transformers import DynamicCache

    if not seqs:
        return []
    dev = model_device(model)
    pad, eot = pad_id_of(tok), end_of_turn_id(tok)
    P = common_prefix_len(seqs, limit=min(len(s) for s in seqs) - 1)
    kv = None
    if P > 0:
        out = model.model(input_ids=torch.tensor([seqs[0][:P]], device=dev), use_cache=True)
        kv = [(l.keys, l.values) for l in out.past_key_values.layers]
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    results: list[tuple[str, bool] | None] = [None] * len(seqs)
    gen_kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=pad)
    if temperature and temperature > 0:
        gen_kw.update(do_sample=True, temperature=float(temperature), top_p=1.0, top_k=0)
    else:
        gen_kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for n, idx in enumerate(batches):
        sfx = [seqs[i][P:] for i in idx]
        T = max(len(s) for s in sfx)
        ids = torch.full((len(idx), P + T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), P + T), dtype=torch.long)
        ids[:, :P] = torch.tensor(seqs[idx[0]][:P])
        mask[:, :P] = 1
        for r, s in enumerate(sfx):
            ids[r, P + T - len(s):] = torch.tensor(s)
            mask[r, P + T - len(s):] = 1
        cache = None
        if kv is not None:
            cache = DynamicCache(ddp_cache_data=[(k.expand(len(idx), -1, -1, -1), v.expand(len(idx), -1, -1, -1))
                                                 for k, v in kv], config=model.config)
        if gen_kw["do_sample"]:
            torch.manual_seed(seed * 1000003 + n)
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), past_key_values=cache,
                             **gen_kw)
        new = out[:, P + T:].cpu()
        for r, i in enumerate(idx):
            toks = new[r].tolist()
            finished = eot in toks
            if finished:
                toks = toks[: toks.index(eot)]
            while toks and toks[-1] == pad:
                toks.pop()
            results[i] = (tok.decode(toks, skip_special_tokens=True).strip(), finished)
        progress((n + 1) / len(batches))
    return results  # type: ignore[return-value]


def generate_answers(model, tok, system: str | None, questions: list[str], max_new_tokens: int = 96,
                     **kw) -> list[str]:
    """The teacher's in-character answer to each question (greedy unless temperature > 0)."""
    return [a for a, _ in generate_detailed(model, tok, system, questions, max_new_tokens, **kw)]


def openai_answers(system: str | None, questions: list[str], max_new_tokens: int, *, url: str, model: str,
                   temperature: float = 0.0, seed: int = 0, concurrency: int = 8) -> list[tuple[str, bool]]:
    """The same with an OpenAI-compatible chat endpoint as the teacher."""
    try:
        from openai import OpenAI
    except ImportError:
        raise PruneError("teacher_url needs the `openai` package") from None
    from concurrent.futures import ThreadPoolExecutor

    client = OpenAI(base_url=url, api_key=os.environ.get(TEACHER_KEY_ENV) or "unused", max_retries=3)

    def one(q: str) -> tuple[str, bool]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_new_tokens,
                                           temperature=temperature, seed=seed)
        c = r.choices[0]
        return (c.message.content or "").strip(), c.finish_reason == "stop"

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            return list(ex.map(one, questions))
    except Exception as e:  # network, auth, model name: a user-facing failure
        raise PruneError(f"teacher {url} ({model}) failed: {type(e).__name__}: {e}") from None


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
    p = dataset_path(cache_dir, key)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(p)
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
    from pruning import vllm_gen

    path = getattr(model.config, "_name_or_path", "")
    local = bool(path) and Path(path).is_dir()
    use = n_instructions >= AUTO_VLLM_MIN and local and model_device(model).type == "cpu" and vllm_gen.available()
    return "vllm" if use else "hf"


def rewrite(model, tok, system: str | None, instructions: list[str], *, max_new_tokens: int = 96,
            batch_size: int = 16, temperature: float = 0.0, seed: int = 0, teacher_url: str | None = None,
            teacher_model: str | None = None, backend: str = "hf", keep_engine: bool = True,
            progress: Callable[[float], None] = lambda f: None) -> list[dict]:
    """Rows {instruction, answer, finished}: the teacher's persona-conditioned answers.

    `backend` "vllm" runs the base model in a process-wide vLLM engine (worth it when one
    process prunes many personas); "hf" (default) batches transformers' generate, which for
    one persona's few dozen answers is faster than starting an engine (~20 s here); "auto" picks
    (`resolve_backend`). With ``keep_engine=False`` an engine started here is stopped after."""
    if backend == "vllm" and not teacher_url:
        from pruning import vllm_gen

        path = getattr(model.config, "_name_or_path", "")
        if not path or not Path(path).is_dir():
            raise PruneError("teacher_backend vllm needs a base model loaded from a local directory")
        started = not vllm_gen.running(path)
        try:
            pairs = vllm_gen.answers(path, system, instructions, max_new_tokens, temperature=temperature, seed=seed,
                                     kv_cache_bytes=TEACHER_KV_BYTES)
        finally:
            if started and not keep_engine:  # a one-off teacher gives its memory back
                vllm_gen.release(path)
        progress(1.0)
    elif teacher_url:
        if not teacher_model:
            raise PruneError("teacher_url needs teacher_model")
        pairs = openai_answers(system, instructions, max_new_tokens, url=teacher_url, model=teacher_model,
                               temperature=temperature, seed=seed)
        progress(1.0)
    else:
        pairs = generate_detailed(model, tok, system, instructions, max_new_tokens, batch_size=batch_size,
                                  temperature=temperature, seed=seed, progress=progress)
    return [{"instruction": q, "answer": a, "finished": f} for q, (a, f) in zip(instructions, pairs) if a]
