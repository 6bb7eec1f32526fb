"""Shared fixtures: one real `npc serve` (embedded Redis, worker, vLLM) for the whole session."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PERSONA_A = ("A grumpy old pirate captain named Rook who loves rum, hates the navy, "
             "and speaks in salty sea slang about storms, treasure and his ship.")
PERSONA_B = ("A cheerful village baker who wakes before dawn, adores sourdough and cinnamon buns, "
             "and gives everyone gentle advice with a baking metaphor.")


def _default_models_dir() -> Path:
    from service.settings import Settings

    return Settings().models


@pytest.fixture(scope="session")
def models_dir() -> Path:
    d = _default_models_dir()
    if not (d / "smollm2-135m-instruct" / "config.json").is_file():
        pytest.fail(f"default model missing in {d}: run `make setup` (or `npc models pull`)")
    return d


@pytest.fixture(scope="session")
def base_dir(models_dir) -> Path:
    return models_dir / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def openai_schemas() -> dict:
    return json.loads((SHARED / "data/openai/openai_chat_schemas.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, models_dir: Path, extra_env: dict | None = None,
                 args: list[str] | None = None, headers: dict | None = None):
        self.data_dir, self.models_dir = data_dir, models_dir
        self.port = free_port()
        self.worker_metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = extra_env or {}
        self.args = args or []
        self.headers = headers or {}
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / f"serve-{self.port}.log"

    def start(self, timeout: float = 120) -> "Server":
        env = {**os.environ, "NPC_DATA_DIR": str(self.data_dir), "NPC_MODELS_DIR": str(self.models_dir),
               "NPC_PORT": str(self.port),
               "NPC_WORKER_METRICS_PORT": str(self.worker_metrics_port), "NPC_KV_CACHE_BYTES": str(256 << 20),
               # the product default (persona-pruner, evaluated) takes minutes per NPC; tests that are not
               # about it use the seconds-fast activation method and opt in where they need more
               "NPC_DEFAULT_METHOD": "activation", "NPC_EVALUATE": "0",
               # one engine per shape keeps the shared server's engine count (and CI time) fixed;
               # tests/test_slots.py covers several slots
               "NPC_ENGINE_SLOTS": "1",
               # the swap engine is what most engine tests are about; tests/test_mixed.py covers the
               # product default, mixed batches (NPC_MIXED_BATCHES=1)
               "NPC_MIXED_BATCHES": "0", **self.extra_env}
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
        assert r.status_code == 202, r.text
        return r.json()

    def wait_ready(self, npc_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            rec = httpx.get(f"{self.url}/v1/npcs/{npc_id}", timeout=10, headers=self.headers).json()
            if rec["status"] in ("ready", "failed"):
                assert rec["status"] == "ready", rec
                return rec
            time.sleep(1)
        raise TimeoutError(f"{npc_id} not ready in {timeout}s")


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir):
    srv = Server(tmp_path_factory.mktemp("npc-data"), models_dir).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def npc_a(server) -> dict:
    rec = server.create_npc("Captain Rook", PERSONA_A, sparsity=0.25)
    return server.wait_ready(rec["id"])


@pytest.fixture(scope="session")
def npc_b(server, npc_a) -> dict:
    rec = server.create_npc("Bea the Baker", PERSONA_B, sparsity=0.25, method="activation-prompt")
    return server.wait_ready(rec["id"])


@pytest.fixture(scope="session")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
