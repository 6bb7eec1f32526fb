"""Control plane on real parts: worker death, cancel, idempotency, corrupt checkpoints, tenants, cards."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service import redis_embedded
from service.devserver import stop_all
from tests.conftest import PERSONA_A, PERSONA_B, ROOT, SHARED, Server

pytestmark = pytest.mark.slow
ALPHA, BETA, ROOT_KEY = "key-alpha", "key-beta", "key-root"
A = {"Authorization": f"Bearer {ALPHA}"}
B = {"Authorization": f"Bearer {BETA}"}
ADMIN = {"Authorization": f"Bearer {ROOT_KEY}"}


class Cluster:
    """A Redis, an API with no worker of its own, and workers started and killed by the tests."""

    def __init__(self, tmp: Path, models_dir: Path):
        self.redis_proc, self.redis_url = redis_embedded.start(tmp / "redis")
        self.tmp, self.models_dir = tmp, models_dir
        self.env = {"REDIS_URL": self.redis_url, "NPC_API_KEYS": f"{ALPHA},{BETA}", "NPC_ADMIN_KEYS": ROOT_KEY,
                    "NPC_PREWARM": "false", "NPC_CALIBRATION_PROMPTS": "64"}
        self.api = Server(tmp / "data", models_dir, self.env, args=["--workers", "0"], headers=A).start()
        self.workers: list[subprocess.Popen] = []

    def start_worker(self, **extra_env: str) -> subprocess.Popen:
        env = {**os.environ, **self.env, "NPC_DATA_DIR": str(self.api.data_dir),
               "NPC_MODELS_DIR": str(self.models_dir), **extra_env}
        env.pop("NPC_WORKER_METRICS_PORT", None)
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "ab")
        w = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env, cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        stop_all(self.workers)
        self.workers.clear()

    def get(self, npc_id: str, headers=A) -> dict:
        return httpx.get(f"{self.api.url}/v1/npcs/{npc_id}", headers=headers, timeout=10).json()

    def wait_for(self, npc_id: str, pred, timeout: float = 300, step: float = 0.2) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            rec = self.get(npc_id)
            if pred(rec):
                return rec
            time.sleep(step)
        raise TimeoutError(f"{npc_id}: condition not met; last {rec}")

    def close(self) -> None:
        self.stop_workers()
        self.api.stop()
        redis_embedded.stop(self.redis_proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir):
    c = Cluster(tmp_path_factory.mktemp("cluster"), models_dir)
    yield c
    c.close()


def test_auth_required_except_health_and_metrics(cluster):
    url = cluster.api.url
    for method, path in (("GET", "/v1/npcs"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/npcs"), ("GET", "/v1/npcs/npc-x"), ("DELETE", "/v1/npcs/npc-x")):
        r = httpx.request(method, url + path, json={})
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.request(method, url + path, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    assert httpx.get(url + "/v1/workers", headers=A).status_code == 403
    assert httpx.get(url + "/v1/workers", headers=ADMIN).status_code == 200


def test_worker_killed_mid_learning_resumes_once(cluster):
    w1 = cluster.start_worker()
    npc = cluster.api.create_npc("Rook", PERSONA_A, sparsity=0.25)
    cluster.wait_for(npc["id"], lambda r: r["stage"] == "learning" and r["progress"] > 0.1, timeout=300)
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    killed = time.time()
    cluster.start_worker()
    resumed = cluster.wait_for(npc["id"], lambda r: r["attempts"] >= 2, timeout=120)
    resume_s = time.time() - killed
    rec = cluster.wait_for(npc["id"], lambda r: r["status"] in ("ready", "failed"), timeout=300)
    ready_s = time.time() - killed
    assert rec["status"] == "ready", rec
    assert resumed["attempts"] == 2
    listed = httpx.get(cluster.api.url + "/v1/npcs", headers=A).json()["data"]
    assert [n["id"] for n in listed].count(npc["id"]) == 1 and len(listed) == 1
    npcs_dir = cluster.api.data_dir / "npcs"
    assert sorted(p.name for p in npcs_dir.iterdir()) == [npc["id"]]  # no leftover temp dirs
    print(f"\nkilled job resumed after {resume_s:.1f}s, ready {ready_s:.1f}s after the kill")
    (cluster.tmp / "resume.json").write_text(json.dumps({"resume_s": resume_s, "ready_s": ready_s}))


def test_a_stalled_worker_whose_job_was_handed_over_changes_nothing(cluster):
    """A worker frozen (SIGSTOP) past its heartbeat loses its job to another; woken, its attempt is
    fenced: its writes are refused, it drops its work, and the NPC is the new attempt's."""
    cluster.stop_workers()
    stalled = cluster.start_worker()
    log = cluster.tmp / f"worker-{len(cluster.workers) - 1}.log"
    npc = cluster.api.create_npc("Stall", PERSONA_B, sparsity=0.25)
    cluster.wait_for(npc["id"], lambda r: r["stage"] == "learning" and r["progress"] > 0.1)
    stalled.send_signal(signal.SIGSTOP)
    try:
        cluster.start_worker()
        cluster.wait_for(npc["id"], lambda r: r["attempts"] == 2 and r["status"] == "running", timeout=120)
    finally:
        stalled.send_signal(signal.SIGCONT)
    deadline = time.time() + 60
    while "superseded by attempt 2" not in log.read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert "superseded by attempt 2" in log.read_text()
    rec = cluster.wait_for(npc["id"], lambda r: r["status"] in ("ready", "failed"), timeout=300)
    assert rec["status"] == "ready" and rec["attempts"] == 2, rec
    assert stalled.poll() is None  # the woken worker lives on, for the next job
    left = sorted(p.name for p in (cluster.api.data_dir / "npcs").iterdir() if npc["id"] in p.name)
    assert left == [npc["id"]]
    httpx.delete(f"{cluster.api.url}/v1/npcs/{npc['id']}", headers=A)


def test_cancel_running_job(cluster):
    if not any(w.poll() is None for w in cluster.workers):
        cluster.start_worker()
    npc = cluster.api.create_npc("Bea", PERSONA_B, sparsity=0.5)
    cluster.wait_for(npc["id"], lambda r: r["stage"] == "learning")
    t0 = time.time()
    r = httpx.delete(f"{cluster.api.url}/v1/npcs/{npc['id']}", headers=A)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    rec = cluster.wait_for(npc["id"], lambda r: r["stage"] == "cancelled", timeout=10)
    assert time.time() - t0 < 10
    assert rec["status"] == "cancelled"
    time.sleep(1)
    npcs_dir = cluster.api.data_dir / "npcs"
    assert not [p for p in npcs_dir.iterdir() if npc["id"] in p.name]  # no checkpoint, no temp dir
    # a second DELETE removes the record
    assert httpx.delete(f"{cluster.api.url}/v1/npcs/{npc['id']}", headers=A).json()["deleted"] is True
    assert httpx.get(f"{cluster.api.url}/v1/npcs/{npc['id']}", headers=A).status_code == 404


def test_a_job_past_its_timeout_ends_failed_with_the_reason(cluster):
    """A job that runs too long is not left `running` for ever: it ends failed, saying why."""
    cluster.stop_workers()
    cluster.start_worker(NPC_JOB_TIMEOUT_S="10")
    try:
        npc = cluster.api.create_npc("Slow Sam", PERSONA_B, sparsity=0.25, method="persona-pruner")
        rec = cluster.wait_for(npc["id"], lambda r: r["status"] in ("ready", "failed"), timeout=240)
        assert rec["status"] == "failed" and "timed out after 10 s" in rec["error"], rec
    finally:
        cluster.stop_workers()
        cluster.start_worker()  # an ordinary one, for the tests after this
    assert not (cluster.api.data_dir / "npcs" / npc["id"]).exists()


def test_idempotency_key(cluster):
    body = {"name": "Idem", "persona": "A calm monk who speaks in riddles.", "sparsity": 0.5}
    h = {**A, "Idempotency-Key": "create-monk-1"}
    r1 = httpx.post(cluster.api.url + "/v1/npcs", json=body, headers=h)
    r2 = httpx.post(cluster.api.url + "/v1/npcs", json=body, headers=h)
    assert r1.status_code == 202 and r2.status_code == 202
    assert r1.json()["id"] == r2.json()["id"]
    r3 = httpx.post(cluster.api.url + "/v1/npcs", json={**body, "sparsity": 0.4}, headers=h)
    assert r3.status_code == 409 and r3.json()["error"]["code"] == "idempotency_key_reused"
    # another tenant's identical key is its own
    r4 = httpx.post(cluster.api.url + "/v1/npcs", json=body, headers={**B, "Idempotency-Key": "create-monk-1"})
    assert r4.status_code == 202 and r4.json()["id"] != r1.json()["id"]
    names = [n["name"] for n in httpx.get(cluster.api.url + "/v1/npcs", headers=A).json()["data"]]
    assert names.count("Idem") == 1
    for npc_id, hdr in ((r1.json()["id"], A), (r4.json()["id"], B)):
        httpx.delete(f"{cluster.api.url}/v1/npcs/{npc_id}", headers=hdr)


def test_tenant_caps_answer_429_with_retry_after(cluster):
    """No worker runs here, so created NPCs stay queued: the 5th job of one key is refused (default
    NPC_TENANT_MAX_JOBS=4), an admin key is not capped, pins are capped by what the engines can
    hold, and oversized work is a 400 before anything is written."""
    url, made = cluster.api.url, []

    def create(hdr, **kw):
        r = httpx.post(url + "/v1/npcs", headers=hdr, timeout=30,
                       json={"name": "Capped", "persona": "A terse ferryman.", "sparsity": 0.5, **kw})
        if r.status_code == 202 or r.status_code == 200:
            made.append((r.json()["id"], hdr))
        return r

    try:
        assert all(create(B).status_code == 202 for _ in range(4))
        r = create({**B, "Idempotency-Key": "fifth"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "job_limit", r.text
        assert int(r.headers["retry-after"]) > 0 and "NPC_TENANT_MAX_JOBS" in r.json()["error"]["message"]
        assert create(A).status_code == 202  # another key has its own jobs
        assert create(ADMIN).status_code == 202
        httpx.delete(f"{url}/v1/npcs/{made[0][0]}", headers=B)
        made.pop(0)
        r = create({**B, "Idempotency-Key": "fifth"})  # the refused key is not spent: the retry is made
        assert r.status_code == 202, r.text

        # one engine slot per shape here (NPC_ENGINE_SLOTS=1): one pin in all, whoever asks
        pinned = create(A, sparsity=0, keep_alive="pin")
        assert pinned.status_code == 202 and pinned.json()["keep_alive"] == -1, pinned.text
        for hdr in (A, ADMIN):
            r = create(hdr, sparsity=0, keep_alive="pin")
            assert r.status_code == 429 and r.json()["error"]["code"] == "pins_full", r.text
            assert r.headers["retry-after"]
        httpx.delete(f"{url}/v1/npcs/{pinned.json()['id']}", headers=A)  # its pin is given back
        assert create(ADMIN, sparsity=0, keep_alive="pin").status_code == 202

        r = create(A, options={"steps": 5000, "batch_size": 256, "max_length": 8192})
        assert r.status_code == 400 and r.json()["error"]["code"] == "job_too_large", r.text
        assert "NPC_MAX_JOB_TOKENS" in r.json()["error"]["message"]
    finally:
        for npc_id, hdr in made:
            httpx.delete(f"{url}/v1/npcs/{npc_id}", headers=hdr)


def test_tenants_are_isolated(cluster):
    mine = [n for n in httpx.get(cluster.api.url + "/v1/npcs", headers=A).json()["data"] if n["status"] == "ready"]
    assert mine, "the worker-death test leaves a ready NPC for tenant A"
    npc_id = mine[0]["id"]
    assert httpx.get(f"{cluster.api.url}/v1/npcs/{npc_id}", headers=B).status_code == 404
    assert httpx.delete(f"{cluster.api.url}/v1/npcs/{npc_id}", headers=B).status_code == 404
    assert npc_id not in [m["id"] for m in httpx.get(cluster.api.url + "/v1/models", headers=B).json()["data"]]
    assert npc_id in [m["id"] for m in httpx.get(cluster.api.url + "/v1/models", headers=A).json()["data"]]
    assert npc_id in [m["id"] for m in httpx.get(cluster.api.url + "/v1/models", headers=ADMIN).json()["data"]]
    r = httpx.post(cluster.api.url + "/v1/chat/completions", headers=B,
                   json={"model": npc_id, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_events_stream_until_done(cluster):
    npc = cluster.api.create_npc("Evie", "A nervous apprentice wizard who loves owls.", sparsity=0.5)
    seen = []
    with httpx.stream("GET", f"{cluster.api.url}/v1/npcs/{npc['id']}/events", headers=A, timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line[5:]))
    assert seen[-1]["status"] == "ready"
    stages = [s["stage"] for s in seen]
    # the stream saw the job work and finish (short stages may fall between two polls: the record's
    # timings name every stage it went through)
    assert len(seen) >= 2 and stages[-1] == "ready"
    assert {"loading", "learning", "exporting"} <= set(seen[-1]["timings"])
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress)
    assert seen[-1]["timings"]["learning"] > 0 and seen[-1]["timings"]["total"] > 0


def test_corrupt_checkpoint_is_refused(cluster):
    ready = [n for n in httpx.get(cluster.api.url + "/v1/npcs", headers=A).json()["data"] if n["name"] == "Evie"]
    npc_id = ready[0]["id"]
    weights = cluster.api.data_dir / "npcs" / npc_id / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    r = httpx.post(cluster.api.url + "/v1/chat/completions", headers=A, timeout=60,
                   json={"model": npc_id, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 409, r.text
    assert "sha256" in r.json()["error"]["message"]
    rec = cluster.get(npc_id)
    assert rec["status"] == "failed" and "model.safetensors" in rec["error"]
    engines = httpx.get(cluster.api.url + "/v1/engines", headers=ADMIN).json()["data"]
    assert not engines  # nothing was loaded from the corrupt files


def test_metrics_show_npc_ids_to_their_tenant_only(cluster):
    # the refused chat above counted a request under Evie's id, tenant A's NPC
    evie = [n for n in httpx.get(cluster.api.url + "/v1/npcs", headers=A).json()["data"] if n["name"] == "Evie"][0]
    series = f'npc="{evie["id"]}"'

    def scrape(headers=None):
        r = httpx.get(cluster.api.url + "/metrics", headers=headers or {})
        assert r.status_code == 200
        return r.text

    assert series in scrape(A) and series in scrape(ADMIN)
    for text in (scrape(B), scrape()):
        assert series not in text
        assert "npc_jobs{" in text and "npc_queue_depth" in text  # the series without NPC ids stay
    assert httpx.get(cluster.api.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401


def _png_with(chunk: str, payload: bytes) -> bytes:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(chunk, base64.b64encode(payload).decode())
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 100, 50)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


CARDS = sorted((SHARED / "data/cards").glob("*.json"))
CARDS = [c for c in CARDS if c.name != "SOURCES.json"]


@pytest.mark.parametrize("card_file", CARDS, ids=[c.stem for c in CARDS])
@pytest.mark.parametrize("form", ["json-body", "json-file", "png-chara", "png-ccv3", "v1-only"])
def test_character_cards_import(cluster, card_file, form):
    raw = card_file.read_bytes()
    card = json.loads(raw)
    url = cluster.api.url + "/v1/npcs"
    if form == "json-body":
        r = httpx.post(url, headers=A, json={"card": card, "sparsity": 0.5})
    elif form == "v1-only":
        v1 = {k: v for k, v in card.items() if k not in ("data", "spec", "spec_version")}
        r = httpx.post(url, headers=A, json={"card": v1, "sparsity": 0.5})
    else:
        content = raw if form == "json-file" else _png_with(form.split("-")[1], raw)
        r = httpx.post(url, headers=A, data={"sparsity": "0.5"},
                       files={"card": (card_file.stem + (".json" if form == "json-file" else ".png"), content)})
    assert r.status_code == 202, r.text
    rec = r.json()
    name = (card.get("data") or card)["name"]
    assert rec["name"] == name
    assert "{{char}}" not in rec["persona"] and "{{user}}" not in rec["persona"]
    assert rec["greeting"] and "{{char}}" not in rec["greeting"]
    httpx.delete(f"{url}/{rec['id']}", headers=A)  # cancel: the pruning itself is tested elsewhere


def test_a_card_npc_is_pruned_on_its_lore(cluster):
    """A card's lore questions are in its persona-pruner data (the cached dataset's anchor rows), and the
    NPC ends ready through a real worker."""
    if not any(w.poll() is None for w in cluster.workers):
        cluster.start_worker()
    card = json.loads((SHARED / "data/cards/seraphina.st_default.v2.json").read_text())
    r = httpx.post(cluster.api.url + "/v1/npcs", headers=A, timeout=30,
                   json={"card": card, "sparsity": 0.25, "method": "persona-pruner", "options": {"profile": "fast"}})
    assert r.status_code == 202, r.text
    rec = cluster.wait_for(r.json()["id"], lambda r: r["status"] in ("ready", "failed"), timeout=600)
    assert rec["status"] == "ready", rec
    rows = [json.loads(line) for p in (cluster.api.data_dir / "cache").rglob("*.jsonl") for line in p.open()]
    lore = {row["instruction"] for row in rows if row.get("anchor")}
    assert "What can you tell me about eldoria?" in lore and "What does shadowfang mean to you?" in lore, lore


def test_bad_cards(cluster):
    url = cluster.api.url + "/v1/npcs"
    r = httpx.post(url, headers=A, files={"card": ("x.png", b"\x89PNG\r\n\x1a\nnot really")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "card"
    r = httpx.post(url, headers=A, files={"card": ("x.png", _png_with("other", b"{}"))})
    assert r.status_code == 400 and "chara" in r.json()["error"]["message"]
    r = httpx.post(url, headers=A, json={"card": {"description": "no name"}})
    assert r.status_code == 400
    r = httpx.post(url, headers=A, json={"card": {"name": "X"}, "persona": "also a persona"})
    assert r.status_code == 400
