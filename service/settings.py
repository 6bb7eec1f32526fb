"""Settings from the environment (prefix NPC_; REDIS_URL also read bare)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from typing import Annotated, Literal

from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.basemodels import DEFAULT_MODEL


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NPC_", extra="ignore")

    data_dir: Path = Field(Path("~/.local/share/npc"), description="NPC checkpoints, embedded Redis data")
    models_dir: Path | None = Field(None, description="base models; default <data_dir>/models")
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "NPC_REDIS_URL"),
        description="unset: an embedded Redis server persisted in the data dir",
    )
    store_url: str | None = Field(None, description="checkpoint store URL (s3://bucket/prefix); unset: data dir")
    base_model: str = Field(DEFAULT_MODEL, description="model name under models_dir, or a HF model dir")
    core_sparsity: float = Field(0.0, ge=0, lt=0.9, description="a shared pruned core of the base at this FFN "
                                 "sparsity: NPCs at or above it are pruned within it and mixed engines run it "
                                 "(0: none; built at start from the shipped core, or `npc models core`)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Bearer keys; empty: no auth")
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="keys that see every tenant")
    api_keys_file: Path | None = Field(None, description="one key per line, '<key> admin' for admins, # comments")
    host: str = "127.0.0.1"
    port: int = 8000
    engine_memory_fraction: float = Field(0.15, gt=0, le=1, description="vLLM gpu_memory_utilization (CPU memory on CPU hosts)")
    engine_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="vLLM dtype; auto: bfloat16, or float32 on a CPU without native bf16 (2x faster there)")
    kv_cache_bytes: int | None = Field(None, description="fixed KV cache size; overrides the memory fraction")
    max_model_len: int = 2048
    max_waiting: int = Field(64, description="requests queued per engine before 429")
    max_persona_chars: int = 4000
    default_max_tokens: int = 256
    calibration_prompts: int = 32
    default_method: str = Field("persona-pruner", description="pruning method when a request names none")
    default_profile: str = Field("default", pattern="^(fast|default|thorough)$",
                                 description="persona-pruner effort when a request names none")
    evaluate: bool = Field(True, description="score every new NPC against the dense base (KL, NLL, attribution)")
    max_engines: int = Field(2, ge=1, description="vLLM engines kept running, all shapes together (memory budget)")
    engine_slots: int = Field(2, ge=1, description="engines per NPC shape, each holding one NPC at a time (2 measured best on 2 cores)")
    cpu_bind: bool = Field(True, description="bind each engine's worker to its own CPU core (least used first)")
    job_timeout_s: int = Field(3600, ge=10, description="a pruning job running longer ends failed, with the reason")
    job_max_tries: int = Field(3, ge=1, le=20, description="attempts per pruning job (a worker killed mid-job "
                               "hands it on); after the last, the NPC ends failed, with the reason")
    job_retry_s: float = Field(15.0, ge=0, description="an attempt that hit a host fault (disk full, I/O error, "
                               "the checkpoint store down) is queued again after this long, for any worker")
    fault_hold: str | None = Field(None, pattern=r"^[a-z]+:\d+(\.\d+)?$",
                                   description="testing only, `stage:seconds`: each job waits that long when it "
                                               "enters that stage, so a fault test can kill its worker there")
    instant_npcs: bool = Field(True, description="an NPC chats at once on the dense base with its persona prompt "
                               "while its prune runs; the pruned model takes over between requests when ready")
    mixed_batches: bool = Field(True, description="serve compact NPCs of one base from one engine, "
                                "their requests batched together (dense FFN + per-token channel masks)")
    hot_npcs: int = Field(1, ge=0, description="NPCs that may each have an engine of their own at once (hot: "
                          "sustained concurrent load), beyond NPC_MAX_ENGINES, ~2 GiB each; 0: never")
    hot_promote_at: float = Field(4.0, gt=0, description="mean requests in flight over NPC_HOT_AFTER_S that "
                                  "make an NPC hot")
    hot_demote_at: float = Field(1.0, ge=0, description="a hot NPC whose mean in flight over NPC_HOT_IDLE_S is "
                                 "below this returns to the mixed engine")
    hot_after_s: float = Field(10.0, ge=1, description="seconds of sustained load before an NPC is promoted")
    hot_idle_s: float = Field(60.0, ge=1, description="seconds of low load before a hot NPC is demoted")
    hot_compile: bool = Field(False, description="hot engines run vLLM's torch.compile (no LoRA there)")
    mixed_compile: bool = Field(False, description="mixed engines run vLLM's torch.compile (their mask layer is "
                                "compile-safe; the first start of a shape compiles for minutes, later ones "
                                "read vLLM's compile cache)")
    mixed_batch_npcs: int = Field(32, ge=1, description="distinct NPCs in one engine batch (vLLM max_loras)")
    mixed_loaded_npcs: int = Field(512, ge=1, description="NPC masks an engine keeps loaded (vLLM max_cpu_loras)")
    tenant_max_npcs: int = Field(1000, ge=1, description="NPC records one API key may hold (admin keys: no cap)")
    tenant_max_jobs: int = Field(4, ge=1, description="NPCs one API key may have queued or being pruned at once "
                                 "(admin keys: no cap); past it, POST /v1/npcs answers 429")
    tenant_max_streams: int = Field(4, ge=1, description="chat and completion requests one API key may have "
                                    "generating at once; more: 429 + Retry-After (admin keys: no cap)")
    tenant_max_pins: int = Field(2, ge=0, description="NPCs one API key may pin (keep_alive -1; admin keys: no cap)")
    max_queued_jobs: int = Field(64, ge=1, description="pruning jobs waiting, all keys together, before "
                                 "POST /v1/npcs answers 429")
    max_job_tokens: int = Field(20_000_000, ge=1, description="a create's options may ask for at most this many "
                                "tokens of work (learning steps x batch x length, plus the teacher's answers)")
    load_wait_s: float = Field(20.0, ge=0, description="longest POST /v1/npcs/{id}/load waits before it answers "
                                                       "202 and the load goes on in the background")
    keep_alive: float = Field(300.0, description="seconds an idle NPC keeps its slot; -1: pinned")
    worker_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                               description="where a worker prunes: auto (CUDA when the host has it, bf16; else "
                                           "the CPU, fp32), cpu, cuda, cuda:N")
    worker_metrics_port: int | None = Field(None, description="port of a worker's /metrics; unset: none")
    max_npc_labels: int = Field(500, ge=1, description="NPCs with their own metric labels; the rest: _other")
    prewarm: bool = Field(True, description="start an engine as soon as an NPC of a new shape is ready")

    @model_validator(mode="after")
    def _hysteresis(self):
        if self.hot_demote_at >= self.hot_promote_at:
            raise ValueError(f"NPC_HOT_DEMOTE_AT ({self.hot_demote_at}) must be below NPC_HOT_PROMOTE_AT "
                             f"({self.hot_promote_at}): an NPC would be promoted and demoted at once")
        return self

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    def keys(self) -> dict[str, bool]:
        """Every accepted key -> whether it is an admin key."""
        keys = {k: False for k in self.api_keys}
        keys.update({k: True for k in self.admin_keys})
        if self.api_keys_file:
            for line in Path(self.api_keys_file).expanduser().read_text().splitlines():
                fields = line.split("#", 1)[0].split()
                if fields:
                    keys[fields[0]] = len(fields) > 1 and fields[1].lower() == "admin"
        return keys

    @property
    def data(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def max_pins(self) -> int:
        """Pins the engines can hold and still serve an unpinned NPC: a mixed engine's batch slots
        minus one; in swap mode a shape's engine slots minus one (at least one pin: with a single
        slot, the pinned NPC's shape serves only it, which an admin may want)."""
        return max(1, (self.mixed_batch_npcs if self.mixed_batches else self.engine_slots) - 1)

    @property
    def models(self) -> Path:
        return (self.models_dir or self.data / "models").expanduser().resolve()

    @property
    def npcs_dir(self) -> Path:
        return self.data / "npcs"


@lru_cache
def get_settings() -> Settings:
    return Settings()
