"""vLLM engine arguments and CPU binding, for every engine this project starts.

The pruning teacher (offline `LLM`) and the service's serving engines (`AsyncLLM`) run the same
model directories with the same settings; only what differs (LoRA masks, the worker extension)
is passed in. Importable without vLLM or torch.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

BIND_VARS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
# engines read their CPU binding from the environment when their process is spawned
_ENV_LOCK = threading.Lock()


DTYPES = ("auto", "bfloat16", "float16", "float32")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX). Without it oneDNN has no bf16
    matmul, vLLM falls back to a slow path, and fp32 decodes ~2x faster (measured on an AVX2-only
    EPYC: 40 vs 19 tokens/s, benchmarks/experiments/token_path.py)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: leave vLLM's usual choice
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def engine_dtype(requested: str | None = None) -> str:
    """The engines' dtype: NPC_ENGINE_DTYPE (default "auto": bfloat16, or float32 on a CPU host
    without native bf16)."""
    dtype = requested or os.environ.get("NPC_ENGINE_DTYPE", "auto")
    if dtype not in DTYPES:
        raise ValueError(f"NPC_ENGINE_DTYPE={dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    return "float32" if cpu_platform() and not cpu_has_bf16() else "bfloat16"


def engine_kwargs(model_dir: str, *, max_model_len: int = 2048, kv_cache_bytes: int | None = None,
                  memory_fraction: float = 0.15, dtype: str | None = None, **extra) -> dict:
    """Keyword arguments of `vllm.LLM` / `AsyncEngineArgs` for one model directory.

    `kv_cache_bytes` fixes the KV cache; otherwise `memory_fraction` is vLLM's
    gpu_memory_utilization (CPU memory on CPU hosts)."""
    kw = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=engine_dtype(dtype), enforce_eager=True,
              max_model_len=max_model_len, seed=0, enable_prefix_caching=True, disable_log_stats=True)
    if kv_cache_bytes:
        kw["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    else:
        kw["gpu_memory_utilization"] = float(memory_fraction)
    kw.update(extra)
    return kw


def env_engine_kwargs(model_dir: str, kv_cache_bytes: int | None = None, **extra) -> dict:
    """`engine_kwargs` sized by NPC_KV_CACHE_BYTES / NPC_ENGINE_MEMORY_FRACTION when set (the
    pruning teacher, which runs outside the service's settings)."""
    mem = os.environ.get("NPC_KV_CACHE_BYTES") or kv_cache_bytes
    return engine_kwargs(model_dir, kv_cache_bytes=int(mem) if mem else None,
                         memory_fraction=float(os.environ.get("NPC_ENGINE_MEMORY_FRACTION", "0.15")), **extra)


def binding_env(cores: list[int] | str | None) -> dict[str, str]:
    """The environment that binds an engine's compute threads to `cores` (none reserved for its
    front end); {} leaves vLLM's own binding."""
    if cores is None or cores == []:
        return {}
    spec = cores if isinstance(cores, str) else ",".join(map(str, cores))
    return {BIND_VARS[0]: spec, BIND_VARS[1]: "0"}


def small_box_cores() -> list[int] | None:
    """Every core of this process on a small CPU box (<= 4 cores), None elsewhere or when the
    user set VLLM_CPU_* binding explicitly.

    vLLM-CPU's automatic binding reserves a core per NUMA node for its front end, so on 2 cores
    an offline engine (whose front end only waits) computes on one: the teacher's 256 answers
    took 121 s instead of ~65 s."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus or len(cpus) > 4 or any(n in os.environ for n in BIND_VARS) or not cpu_platform():
        return None
    return cpus


def cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform
        return bool(current_platform.is_cpu())
    except Exception:
        return False


@contextmanager
def spawn_env(env: dict[str, str]):
    """Set `env` while an engine process is spawned (it reads its binding then), restored after;
    one spawn at a time."""
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
