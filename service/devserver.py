"""`npc serve` as a child process on a free local port, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "smollm2-135m-instruct"

# NPCs in seconds, not minutes: the product default (persona-pruner, evaluated) takes minutes per
# NPC, so a server for tests uses the activation method and opts in where it needs more; one engine
# per shape keeps the engine count fixed; swap engines (the mixed-batch default is opted into where
# it is the subject)
FAST_ENV = {
    "NPC_KV_CACHE_BYTES": str(256 << 20),
    "NPC_DEFAULT_METHOD": "activation", "NPC_EVALUATE": "0",
    "NPC_ENGINE_SLOTS": "1",
    "NPC_MIXED_BATCHES": "0",
    # swap engines would start a dense-base engine for an NPC whose prune runs; tests/test_mixed.py
    # covers instant NPCs on the mixed engine, where they cost no engine
    "NPC_INSTANT_NPCS": "0",
}


def default_models_dir() -> Path:
    from service.settings import Settings

    return Settings().models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all(procs, timeout: float = 30) -> None:
    """SIGTERM every process still running, then wait for each; one that outlives `timeout` is killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Server:
    """One `npc serve` with its own data dir; `base_env` under `extra_env` under the port settings."""

    def __init__(self, data_dir: Path, models_dir: Path, extra_env: dict | None = None,
                 args: list[str] | None = None, headers: dict | None = None, base_env: dict | None = None):
        self.data_dir, self.models_dir = data_dir, models_dir
        self.port = free_port()
        self.worker_metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_env = FAST_ENV if base_env is None else base_env
        self.extra_env = extra_env or {}
        self.args = args or []
        self.headers = headers or {}
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / f"serve-{self.port}.log"

    def start(self, timeout: float = 120) -> "Server":
        env = {**os.environ, "NPC_DATA_DIR": str(self.data_dir), "NPC_MODELS_DIR": str(self.models_dir),
               "NPC_PORT": str(self.port), "NPC_WORKER_METRICS_PORT": str(self.worker_metrics_port),
               **self.base_env}
        env.pop("REDIS_URL", None)
        env.update(self.extra_env)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *self.args], env=env, cwd=ROOT,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"npc serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("npc serve did not become healthy")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def create_npc(self, name: str, persona: str, **kw) -> dict:
        r = httpx.post(self.url + "/v1/npcs", json={"name": name, "persona": persona, **kw}, timeout=30,
                       headers=self.headers)
        if r.status_code != 202:
            raise AssertionError(r.text)
        return r.json()

    def wait_ready(self, npc_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            rec = httpx.get(f"{self.url}/v1/npcs/{npc_id}", timeout=10, headers=self.headers).json()
            if rec["status"] in ("ready", "failed"):
                if rec["status"] != "ready":
                    raise AssertionError(rec)
                return rec
            time.sleep(1)
        raise TimeoutError(f"{npc_id} not ready in {timeout}s")
