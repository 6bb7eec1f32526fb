"""The deployment across hosts: each host a network namespace on this machine (ip netns + veth on
one bridge), nothing shared but the network.

    redis   Debian redis-server, with a password and AOF
    s3      moto's S3 server: the checkpoint store
    serve   `npc serve --workers 0` (API + engines), its own data dir and models
    w1, w2  `npc worker`, each with its own data dir and models

An NPC is created on the serving host, pruned on w1, which is SIGKILLed mid-job; w2 finishes it,
publishes it to S3, and the serving host fetches it and chats. Needs root (tests and CI run as root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.devserver import FAST_ENV, stop_all
from tests.conftest import PERSONA_A, ROOT, require, require_module

pytestmark = pytest.mark.slow
NET = "10.213.7"
HOSTS = {"redis": 10, "serve": 11, "w1": 12, "w2": 13, "s3": 14}
PASSWORD = "multihost-pw"
KEY = "key-multihost"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Hosts:
    """Network namespaces on one bridge; the test itself talks to them from the root namespace."""

    def __init__(self, tmp: Path):
        self.tmp, self.tag = tmp, f"{os.getpid() % 10000}"
        self.bridge = f"npcbr{self.tag}"
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{NET}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for name, n in HOSTS.items():
            ns, veth = self.ns(name), f"v{self.tag}{name}"
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{NET}.{n}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def ns(self, name: str) -> str:
        return f"npc{self.tag}-{name}"

    @staticmethod
    def ip(name: str) -> str:
        return f"{NET}.{HOSTS[name]}"

    def run(self, host: str, cmd: list[str], env: dict | None = None, log: str | None = None) -> subprocess.Popen:
        out = open(self.tmp / f"{log or host}.log", "ab")
        # `ip netns exec` execs the command in the namespace: the Popen's pid is the process itself
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], env={**os.environ, **(env or {})},
                             cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def close(self) -> None:
        stop_all(self.procs)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def wait_until(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (httpx.HTTPError, OSError) as e:
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout}s (last: {last})")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if not shutil.which("redis-server"):
        require("Debian redis-server is missing")
    if os.geteuid() != 0 or not shutil.which("ip"):
        require("the multi-host test needs root and iproute2's ip")
    h = Hosts(tmp_path_factory.mktemp("hosts"))
    yield h
    h.close()


def test_prune_on_a_worker_host_survives_its_death_and_serves_on_another(hosts, models_dir):
    require_module("moto.server")
    boto3 = require_module("boto3")
    tmp = hosts.tmp
    (tmp / "redis").mkdir()
    hosts.run("redis", ["redis-server", "--bind", hosts.ip("redis"), "--port", "6379", "--requirepass", PASSWORD,
                        "--appendonly", "yes", "--save", "", "--dir", str(tmp / "redis")])
    hosts.run("s3", [sys.executable, "-m", "moto.server", "-H", hosts.ip("s3"), "-p", "5000"])
    s3_url = f"http://{hosts.ip('s3')}:5000"
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in aws.items() if k != "AWS_DEFAULT_REGION"},
                      region_name="us-east-1")
    wait_until(lambda: s3.create_bucket(Bucket="npcs"), 60, "moto's S3 server")

    def host_env(name: str) -> dict:
        data, models = tmp / name / "data", tmp / name / "models"
        data.mkdir(parents=True)
        shutil.copytree(models_dir, models, copy_function=os.link)  # its own copy (hard links: no disk)
        return {**FAST_ENV, **aws, "NPC_DATA_DIR": str(data), "NPC_MODELS_DIR": str(models),
                "REDIS_URL": f"redis://:{PASSWORD}@{hosts.ip('redis')}:6379/0", "NPC_STORE_URL": "s3://npcs/ckpt",
                "NPC_STORE_ENDPOINT_URL": s3_url, "NPC_API_KEYS": KEY, "NPC_PREWARM": "false",
                "NPC_CALIBRATION_PROMPTS": "64"}

    serve_env = {**host_env("serve"), "NPC_HOST": hosts.ip("serve"), "NPC_PORT": "8000"}
    hosts.run("serve", [sys.executable, "-m", "service.cli", "serve", "--workers", "0"], env=serve_env)
    url = f"http://{hosts.ip('serve')}:8000"
    auth = {"Authorization": f"Bearer {KEY}"}
    wait_until(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, 180, "the serving host")
    worker = [sys.executable, "-m", "service.cli", "worker"]
    w1 = hosts.run("w1", worker, env=host_env("w1"))

    r = httpx.post(url + "/v1/npcs", headers=auth, timeout=30,
                   json={"name": "Rook", "persona": PERSONA_A, "sparsity": 0.25})
    assert r.status_code == 202, r.text
    npc_id = r.json()["id"]

    def rec():
        return httpx.get(f"{url}/v1/npcs/{npc_id}", headers=auth, timeout=10).json()

    wait_until(lambda: rec()["stage"] == "learning" and rec()["progress"] > 0.1, 300, "w1 learning")
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    hosts.run("w2", worker, env=host_env("w2"))
    done = wait_until(lambda: (x := rec())["status"] in ("ready", "failed") and x, 420, "w2 finishing the job")
    assert done["status"] == "ready", done
    assert done["attempts"] == 2

    # published to the store by w2, fetched from it by the serving host: no shared filesystem
    # under the finishing attempt's own name: a stale attempt's upload could not mix with it
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="npcs", Prefix=f"ckpt/{npc_id}").get("Contents", [])]
    assert keys and all(k.startswith(f"ckpt/{npc_id}.a2/") for k in keys) and f"ckpt/{npc_id}.a2/model.safetensors" in keys
    assert not (tmp / "w1" / "data" / "npcs" / npc_id / "model.safetensors").exists()

    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=KEY, timeout=300)
    out = client.chat.completions.create(model=npc_id, messages=[{"role": "user", "content": "Who are you?"}],
                                         max_tokens=16, temperature=0)
    assert out.choices[0].message.content.strip()
    assert (tmp / "serve" / "data" / "cache" / f"{npc_id}.a2" / "model.safetensors").is_file()  # fetched from S3
