"""`npc models pull` is idempotent; a missing base model is one clear error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pruning.manifest import checkpoint_sha256


def test_pull_is_idempotent_and_recorded(base_dir, models_dir):
    rec = json.loads((base_dir / "npc_model.json").read_text())
    assert rec["sha256"] == checkpoint_sha256(base_dir)
    assert json.loads((base_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    env = {**os.environ, "NPC_MODELS_DIR": str(models_dir)}
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "service.cli", "models", "pull"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "already installed" in r.stdout
    assert "reference states already cached" in r.stdout  # computed by the first pull (make setup)
    assert time.time() - t < 60
    r = subprocess.run([sys.executable, "-m", "service.cli", "models", "pull", "--no-warm"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already installed" in r.stdout and "reference states" not in r.stdout, r.stderr


def test_serve_without_model_says_how_to_fix(tmp_path):
    env = {**os.environ, "NPC_MODELS_DIR": str(tmp_path / "none"), "NPC_DATA_DIR": str(tmp_path / "d")}
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "npc models pull" in lines[0], r.stderr
