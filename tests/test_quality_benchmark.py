"""benchmarks/quality.py on another eval folder: the check a new set of personas gets."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
EVAL = SHARED / "data" / "eval"


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "benchmarks.quality", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_other_eval_dir(tmp_path, base_dir):
    ev = tmp_path / "unseen"
    ev.mkdir()
    # persona 3's pair under another number, and a specific file without its general pair
    shutil.copy(EVAL / "persona_alpaca_specific_user_3.json", ev / "persona_alpaca_specific_user_12.json")
    shutil.copy(EVAL / "persona_alpaca_general_user_3.json", ev / "persona_alpaca_general_user_12.json")
    shutil.copy(EVAL / "persona_alpaca_specific_user_1.json", ev)
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--eval-dir", str(ev), "--base", str(base_dir), "--out", str(out), "--work", str(work)]

    bad = _run(*common, "--personas", "1", "--methods", "random")
    assert bad.returncode != 0 and "no specific+general eval pair for persona(s) [1]" in bad.stderr

    r = _run(*common, "--methods", "random,activation-prompt", "--sparsities", "0.5", "--attribution-n", "0",
             "--fidelity-n", "3", "--fidelity-tokens", "12", "--backend", "hf", "--max-new-tokens", "8",
             "--questions", "6")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader((out / "quality.csv").open()))
    assert {(x["persona"], x["method"]) for x in rows} == {("12", "dense"), ("12", "random"), ("12", "activation-prompt")}
    kl = {x["method"]: float(x["persona_kl"]) for x in rows}
    kl_random = next(x for x in rows if x["method"] == "random")["persona_kl"]
    assert kl["dense"] == 0 and 0 < kl["activation-prompt"] < kl["random"]
    ret = {x["method"]: float(x["retention"]) for x in rows}
    assert ret["dense"] == 1.0 and all(0 <= float(x["judge_top1"]) <= 1 for x in rows)
    assert float(next(x for x in rows if x["method"] == "dense")["pmi_retention"]) == 1.0
    md = (out / "quality.md").read_text()
    assert str(ev) in md and "1 personas" in md and "## Persona fidelity" in md

    # --merge with a budget that runs out before the first persona: every stored row stays
    again = _run(*common, "--methods", "random", "--sparsities", "0.5", "--attribution-n", "0", "--fidelity-n", "0",
                 "--backend", "hf", "--max-new-tokens", "8", "--questions", "6", "--merge", "--budget-s", "0.001")
    assert again.returncode == 0, again.stderr[-2000:]
    assert list(csv.DictReader((out / "quality.csv").open())) == rows

    # --rescore: the stored answers give every persona measure again without a model; a row whose
    # answers are not stored loses its measures rather than keep ones judged under other rules
    stored = [json.loads(x) for x in (out / "quality_answers.jsonl").read_text().splitlines()]
    assert {(x["method"], len(x["detail"]["answers"])) for x in stored} == {
        ("dense", 3), ("random", 3), ("activation-prompt", 3)}
    (out / "quality_answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stored if x["method"] != "random"))
    re = _run(*common, "--rescore")
    assert re.returncode == 0, re.stderr[-2000:]
    after = {x["method"]: x for x in csv.DictReader((out / "quality.csv").open())}
    for m in ("dense", "activation-prompt"):
        for k in ("retention", "judge_top1", "pmi_retention", "degenerate", "fluency_nll"):
            assert float(after[m][k]) == float(next(x for x in rows if x["method"] == m)[k]), (m, k)
    assert after["random"]["retention"] == "" and after["random"]["persona_kl"] == kl_random
    report = json.loads((out / "quality.json").read_text())
    assert {r["method"]: r["retention"] for r in report["rows"]}["random"] is None
    assert "`--rescore`" in (out / "quality.md").read_text() and "random@0.5:12" in report["summary"]["runs"][-1]["note"]


def test_within_a_core(tmp_path, base_dir):
    """`--core`: every method prunes inside the core, as the server prunes that core's NPCs, and the
    rows go to a report of their own. At the core's own sparsity any method's mask is the core itself."""
    from pruning.core import build_core

    layers = json.loads((Path(base_dir) / "config.json").read_text())["num_hidden_layers"]
    core = build_core(base_dir, 0.5, tmp_path / "core50", kept=[list(range(0, 1536, 2))] * layers)
    work = tmp_path / "work"
    common = ["--personas", "3", "--base", str(base_dir), "--work", str(work), "--attribution-n", "0",
              "--fidelity-n", "0", "--backend", "hf", "--max-new-tokens", "8", "--questions", "4"]
    not_core = _run(*common, "--core", str(base_dir), "--methods", "random")
    assert not_core.returncode != 0 and "is not a core" in not_core.stderr
    depth = _run(*common, "--core", str(core), "--methods", "depth")
    assert depth.returncode != 0 and "cannot run within a core" in depth.stderr
    r = _run(*common, "--core", str(core), "--methods", "random,activation", "--sparsities", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    out = work / "core-core50"
    rows = list(csv.DictReader((out / "quality.csv").open()))
    kl = {x["method"]: float(x["persona_kl"]) for x in rows}
    assert kl["dense"] == 0 and kl["random"] > 0
    assert kl["random"] == kl["activation"]  # both are exactly the core
    assert "within the core" in (out / "quality.md").read_text()
    assert not (ROOT / "docs" / "core-core50").exists()
