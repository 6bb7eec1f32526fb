"""benchmarks/specificity.py end to end on two personas with the test profile: every mask kind is
learned, every cell scored, the verdict written, and a rerun resumes instead of redoing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cross_matrix_global_neutral_and_seed_rows(tmp_path, base_dir):
    out, work = tmp_path / "out", tmp_path / "work"
    args = [sys.executable, "-m", "benchmarks.specificity", "--base", str(base_dir), "--personas", "0,3",
            "--profile", "fast", "--questions", "2", "--tokens", "8", "--references", "3", "--seeds", "1",
            "--seed-personas", "0", "--no-global-all", "--work", str(work), "--cache", str(tmp_path / "cache"),
            "--out", str(out)]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "specificity.json").read_text())
    cells = {(c["mask"], c["persona"]) for c in data["cells"]}
    assert cells == {(m, u) for m in ("own:0", "own:3", "global", "neutral") for u in (0, 3)} | {("own:0@s1", 0)}
    s = data["summary"]
    assert s["personas"] == [0, 3] and s["compared"] == 2 and 0 <= s["own_best"] <= 2
    assert s["seed_sd"] is not None and "own_minus_global" in s and "own_minus_neutral" in s
    assert all(c["kl"] > 0 and len(c["margins"]) == 2 for c in data["cells"])
    md = (out / "specificity.md").read_text()
    assert "## Verdict" in md and "Own mask best in its row by judge margin" in md and (out / "specificity_margin.png").is_file()

    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "mask own:0" not in again.stdout and "cell " not in again.stdout
