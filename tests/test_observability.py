"""Metrics under a real Prometheus: every dashboard query returns data for every NPC."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time

import httpx
import pytest

from tests.conftest import ROOT, free_port, require

pytestmark = pytest.mark.slow


def _dashboard():
    spec = importlib.util.spec_from_file_location("npc_dashboard_queries", ROOT / "deploy/grafana/queries.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        require("prometheus is not installed (make test-system-deps installs it)")
    d = tmp_path_factory.mktemp("prom")
    cfg = d / "prometheus.yml"
    cfg.write_text(f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: npc-api
    static_configs: [{{targets: ["127.0.0.1:{server.port}"]}}]
  - job_name: npc-worker
    static_configs: [{{targets: ["127.0.0.1:{server.worker_metrics_port}"]}}]
""")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "prom.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline and proc.poll() is None, (d / "prom.log").read_text()[-2000:]
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(20)


def _load(server, oai, npcs, seconds: float) -> None:
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        for npc in npcs:
            stream = oai.chat.completions.create(model=npc["id"], max_tokens=12, stream=True,
                                                 messages=[{"role": "user", "content": f"Tell me a fact #{i}"}])
            for _ in stream:
                pass
            oai.chat.completions.create(model=npc["id"], max_tokens=6,
                                        messages=[{"role": "user", "content": "Hello there!"}])
            # a rejected request per NPC, so error panels have data
            httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": npc["id"], "messages": [{"role": "user", "content": "word " * 3000}]})
        i += 1


def _query(prom: str, q: str) -> list:
    r = httpx.get(prom + "/api/v1/query", params={"query": q}, timeout=30).json()
    assert r["status"] == "success", (q, r)
    return r["data"]["result"]


def test_every_dashboard_query_has_data(server, npc_a, npc_b, oai, prometheus):
    dash = _dashboard()
    _load(server, oai, [npc_a, npc_b], seconds=25)
    time.sleep(3)
    missing = []
    for npc in (npc_a, npc_b):
        for q in dash.dashboard_queries(npc["id"]):
            if not _query(prometheus, q):
                missing.append((npc["id"], q))
    assert not missing, missing
    per_npc = _query(prometheus, 'sum by (npc) (rate(npc_completion_tokens_total[1m]))')
    assert {s["metric"]["npc"] for s in per_npc} >= {npc_a["id"], npc_b["id"]}
    png = os.environ.get("NPC_DASHBOARD_PNG")
    if png:
        _plot(prometheus, dash.dashboard_queries(".*"), png)


def test_dashboard_metrics_exist_in_metrics_endpoints(server, npc_a, prometheus):
    dash = _dashboard()
    exposed = httpx.get(server.url + "/metrics").text + httpx.get(
        f"http://127.0.0.1:{server.worker_metrics_port}/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in exposed.splitlines() if line and not line.startswith("#")}
    import re

    for q in dash.dashboard_queries(npc_a["id"]):
        for metric in re.findall(r"\b(npc_[a-z_]+)\b", q):
            assert metric in names, (metric, q)


def _plot(prom: str, queries: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    n = len(queries)
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(20, 3.2 * ((n + cols - 1) // cols)))
    for ax, q in zip(axes.flat, queries):
        r = httpx.get(prom + "/api/v1/query_range", params={"query": q, "start": end - 60, "end": end,
                                                            "step": 1}).json()
        for s in r["data"]["result"]:
            xs = [float(v[0]) - end for v in s["values"]]
            ys = [float(v[1]) for v in s["values"]]
            ax.plot(xs, ys, label=",".join(f"{k}={v}" for k, v in s["metric"].items())[:40])
        ax.set_title(q[:60], fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
