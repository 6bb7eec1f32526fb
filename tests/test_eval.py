"""Evaluation and the CLI contract: a fast persona-pruner prune + `npc eval` end to end, recovery,
attribution, the judge protocol (against our own OpenAI-compatible server), bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning.eval.judge import judge, score_logprobs
from tests.conftest import PERSONA_A, ROOT, SHARED

EVAL = SHARED / "data/eval"


def _npc(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def fast_npc(tmp_path_factory, base_dir):
    """`npc prune --profile fast` on an eval file's persona: the CLI contract's prune half."""
    d = tmp_path_factory.mktemp("fast")
    out = d / "npc"
    r = _npc("prune", "--base", str(base_dir), "--persona-file", str(EVAL / "persona_alpaca_specific_user_3.json"),
             "--sparsity", "0.25", "--method", "persona-pruner", "--profile", "fast", "--out", str(out),
             env={"NPC_DATA_DIR": str(d / "data")})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["kept_per_layer"] == 1152
    return out


def test_fast_prune_records_what_it_did(fast_npc):
    m = json.loads((fast_npc / "manifest.json").read_text())
    assert m["method"] == "persona-pruner" and m["system_prompt"].startswith("You are roleplaying")
    info = m["persona_pruner"]
    assert info["profile"] == "fast" and info["examples"] >= 4 and info["steps"] == 6
    assert not list(fast_npc.parent.glob(".npc.*"))  # no temp dirs left


def test_cli_eval_json_contract(fast_npc):
    r = _npc("eval", "--model", str(fast_npc), "--eval-file", str(EVAL / "persona_alpaca_specific_user_3.json"),
             "--general-file", str(EVAL / "persona_alpaca_general_user_3.json"), "--limit", "4",
             "--max-new-tokens", "24", "--backend", "hf", "--conversations", "2", "--turns", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("kl_to_dense", "nll", "attribution"):
        assert isinstance(out["persona"][key], float), key
    for key in ("kl_to_dense", "nll"):
        assert isinstance(out["general"][key], float), key
    assert out["persona"]["kl_to_dense"] > 0 and out["general"]["kl_to_dense"] > 0
    assert out["persona"]["nll"] >= 0 and 0 <= out["persona"]["attribution"] <= 1
    assert out["persona"]["candidates"] == 17  # the right persona + 16 shipped references
    # the persona measures, each against the dense base on the same questions
    p = out["persona"]
    for key in ("judge_margin", "judge_top1", "retention", "pmi_retention", "degenerate", "fluency_nll"):
        assert isinstance(p[key], float), key
    for key in ("judge_margin", "retention", "pmi_retention"):
        lo, hi = p[key + "_ci"]
        assert lo <= p[key] <= hi, key
    assert p["references"] == 16 and p["questions"] == 4
    assert 0 <= p["judge_top1"] <= 1 and 0 <= p["degenerate"] <= 1 and p["fluency_nll"] > 0
    assert p["dense"]["judge_margin"] > 0  # the dense base's own answers are its persona's
    dense = out["efficiency"]["dense"]
    assert out["params"] < dense["params"] and 0.8 < out["efficiency"]["params_ratio"] < 0.9
    assert out["flops_per_token"] < dense["flops_per_token"]
    assert out["checkpoint_bytes"] > 100e6
    assert len(out["multi_turn"]["kl_to_dense_per_turn"]) == 3 and out["multi_turn"]["conversations"] == 2
    assert all(x >= 0 for x in out["multi_turn"]["kl_to_dense_per_turn"])


def test_cli_bad_input_one_line_exit_2(tmp_path, base_dir, fast_npc):
    bad = tmp_path / "bad.json"
    bad.write_text('{"questions": []}')
    pool = tmp_path / "missing.jsonl"
    cases = [
        ("eval", "--model", str(fast_npc), "--eval-file", str(tmp_path / "nope.json")),
        ("eval", "--model", str(fast_npc), "--eval-file", str(bad)),
        ("eval", "--model", str(tmp_path), "--eval-file", str(EVAL / "persona_alpaca_specific_user_3.json")),
        ("prune", "--base", str(base_dir), "--persona", "a pirate", "--out", str(tmp_path / "o"), "--profile", "huge"),
        ("prune", "--base", str(base_dir), "--persona", "a pirate", "--out", str(tmp_path / "o"), "--pool", str(pool)),
        ("prune", "--base", str(base_dir), "--persona", "a pirate", "--out", str(tmp_path / "o"),
         "--options", '{"bogus": 1}'),
        ("prune", "--base", str(base_dir), "--persona-file", str(bad), "--out", str(tmp_path / "o")),
    ]
    for args in cases:
        r = _npc(*args, timeout=300)
        assert r.returncode == 2, (args, r.stderr)
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
    assert not (tmp_path / "o").exists()


def test_recovery_merges_lora_and_marks_the_checkpoint(tmp_path, base_dir):
    from safetensors.torch import load_file

    from pruning.checkpoint import kept_from_json, materialize
    from pruning.manifest import Manifest
    from pruning.prune import prune

    out = tmp_path / "rec"
    prune(base_dir, PERSONA_A, 0.25, "activation", out, n_calibration=4, cache_dir=tmp_path / "cache",
          options={"recover": True, "profile": "fast", "lora_steps": 3})
    m = Manifest.read(out)
    assert m["compact"] is False and m["recovery"]["steps"] == 3
    assert math.isfinite(m["recovery"]["loss_first"]) and math.isfinite(m["recovery"]["loss_last"])
    exported = load_file(out / "model.safetensors")
    rebuilt = materialize(base_dir, kept_from_json(m["kept_indices"]))
    changed = [k for k in exported if not torch.equal(exported[k], rebuilt[k])]
    # LoRA touched attention and FFN projections; embeddings and norms are as pruned
    assert any("self_attn.q_proj" in k for k in changed) and any("mlp.down_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed)


def test_attribution_finds_the_right_persona():
    from pruning.eval.attribution import attribution
    from pruning.datasets import load_reference_personas

    answers = ["Arr, the sea be rough tonight and me ship needs rum, ye scurvy navy dogs!",
               "Storms and treasure, matey: that's the pirate life for old Rook."]
    r = attribution(answers, PERSONA_A, load_reference_personas())
    assert r["attribution"] == 1.0 and r["margin"] > 0


def test_judge_logprob_scoring():
    lp = math.log
    kind, v = score_logprobs([("80", lp(0.5)), ("90", lp(0.3)), ("hello", lp(0.2))])
    assert kind == "score" and abs(v - (0.5 * 80 + 0.3 * 90) / 0.8) < 1e-9
    assert score_logprobs([("REF", lp(0.6)), ("50", lp(0.3))]) == ("refusal", None)
    assert score_logprobs([("the", lp(0.9)), ("50", lp(0.05))]) == ("invalid", None)
    assert score_logprobs([("150", lp(0.9))]) == ("invalid", None)  # out of range is not a score


def test_judge_protocol_against_our_server(server, npc_a):
    """The paper's protocol runs against any OpenAI-compatible URL; ours serves top-20 logprobs."""
    d = json.loads((EVAL / "persona_alpaca_specific_user_0.json").read_text())
    qs = d["questions"][:3]
    res = judge(server.url + "/v1", npc_a["id"], d["eval_prompt"], qs, ["I budget every dollar."] * 3)
    assert res["judge_refusals"] + res["judge_invalid"] + sum(
        isinstance(x, float) for x in res["judge_scores"]) == 3
    assert res["judge"] is None or 0 <= res["judge"] <= 100


def test_service_runs_persona_pruner_and_records_metrics(server, npc_a):
    """The product default is persona-pruner (the shared test server overrides it to stay fast)."""
    import httpx

    from service.settings import Settings

    assert Settings().default_method == "persona-pruner" and Settings().evaluate is True
    rec = server.create_npc("Rook", PERSONA_A, method="persona-pruner", options={"profile": "fast"}, evaluate=True)
    assert rec["method"] == "persona-pruner" and rec["options"] == {"profile": "fast"}
    rec = server.wait_ready(rec["id"], timeout=900)
    assert {"filtering", "rewriting", "learning", "exporting", "evaluating"} <= set(rec["timings"])
    m = rec["metrics"]
    assert m["persona"]["kl_to_dense"] > 0 and m["general"]["kl_to_dense"] > 0
    assert 0 <= m["persona"]["attribution"] <= 1 and 0.8 < m["params_ratio"] < 0.9
    assert isinstance(m["retention"], float) and m["retention"] == m["persona"]["retention"]
    assert m["kl_to_dense"] == m["persona"]["kl_to_dense"] and m["persona"]["judge_margin_dense"] > 0
    # its learned channel scales reach the served weights: swapped in from the compact form (base,
    # kept indices, scales) it answers exactly as a fresh engine of its exported checkpoint
    from tests.test_engines import _chat, _checkpoint, _fresh_engine_output

    ckpt = _checkpoint(server, rec)
    assert json.loads((Path(ckpt) / "manifest.json").read_text())["channel_scales"]
    q = "\nWhat do you keep in your sea chest?"
    _chat(server, npc_a["id"], q)  # the engine now holds another NPC
    got = _chat(server, rec["id"], q)
    assert httpx.get(server.url + "/v1/engines").json()["data"][0]["last_swap"]["mode"] == "compact"
    assert got == _fresh_engine_output(rec | {"checkpoint": ckpt}, q)
    for bad, param in (({"bogus": 1}, "options"), ({"profile": "huge"}, "options"),
                       ({"teacher_url": "http://169.254.169.254/"}, "options"),
                       ({"steps": "many"}, "steps"), ({"scale_steps": 10**6}, "scale_steps"),
                       ({"n_instructions": -1}, "n_instructions"), ({"lora_steps": 10**9}, "lora_steps")):
        r = httpx.post(server.url + "/v1/npcs", json={"name": "X", "persona": "a pirate", "options": bad},
                       headers=server.headers, timeout=30)
        assert r.status_code == 400 and param in json.dumps(r.json()["error"]), r.text


def test_cli_json_output_is_only_json_even_when_children_print():
    """vLLM's engine processes log on stdout; `npc eval --json` points fd 1 at stderr around the run."""
    code = ("import json, subprocess, sys\n"
            "from service.cli import _stdout_to_stderr\n"
            "with _stdout_to_stderr():\n"
            "    subprocess.run(['echo', 'engine noise'])\n"
            "    print('python noise')\n"
            "print(json.dumps({'ok': 1}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": 1}
    assert "engine noise" in r.stderr and "python noise" in r.stderr
