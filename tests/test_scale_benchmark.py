"""benchmarks/scale.py runs and reports every call kind for each record count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_benchmark_small(tmp_path, base_dir):
    r = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--records", "300,600", "--requests", "5",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "scale.json").read_text())
    assert [x["records"] for x in results] == [300, 600]
    for x in results:
        assert set(x["calls"]) == {"list first page", "list deep page", "a small tenant's page (50 NPCs)",
                                   "a small tenant's /v1/models", "metrics scrape (admin key)", "get one record",
                                   "chat routing (failed NPC)"}
        assert all(c["n"] == 5 and 0 < c["p50_ms"] <= c["max_ms"] for c in x["calls"].values())
    assert "600 records" in (tmp_path / "scale.md").read_text()
