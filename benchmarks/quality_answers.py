"""The judged answers behind a quality report, kept beside it (`quality_answers.jsonl`): each
model's own answers and the dense judge's NLLs of them, so the persona measures can be computed
again when their rules change (`python -m benchmarks.quality --rescore`) without pruning or
generating anything."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from benchmarks.quality_report import FIDELITY, read_rows, report_only
from pruning.eval.persona import rejudge

ANSWERS = "quality_answers.jsonl"


def keep(out: Path, persona: int, method: str, sparsity: float, detail: dict, prompt: str | None = None) -> None:
    """Append one model's judged answers (`persona_fidelity(..., detail=True)["detail"]`); the dense
    base's record (method "dense") also holds the persona's system prompt the judge used."""
    rec = {"persona": persona, "method": method, "sparsity": sparsity, "detail": detail}
    if prompt is not None:
        rec["prompt"] = prompt
    with open(out / ANSWERS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def stored(out: Path) -> dict[tuple[int, str, float], dict]:
    """(persona, method, sparsity) -> its latest record."""
    p = out / ANSWERS
    recs = {}
    if p.is_file():
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                recs[(int(r["persona"]), r["method"], float(r["sparsity"]))] = r
    return recs


def rescore(a) -> None:
    """Every row's persona measures recomputed from its stored answers under today's rules; a row
    without stored answers loses them (it was judged under other rules). Then the report."""
    from transformers import AutoTokenizer

    out = Path(a.out)
    csv_path = out / "quality.csv"
    with open(csv_path) as f:
        fields = csv.DictReader(f).fieldnames
    fields = fields[:-1] + [k for k in FIDELITY if k not in fields] + fields[-1:]  # "seconds" stays last
    rows, recs = read_rows(csv_path), stored(out)
    tok = AutoTokenizer.from_pretrained(a.base)
    dropped = []
    for r in rows:
        if all(r.get(k) is None for k in FIDELITY):
            continue
        dense = recs.get((r["persona"], "dense", 0.0))
        own = dense if r["method"] == "dense" else recs.get((r["persona"], r["method"], r["sparsity"]))
        if dense is None or own is None:
            dropped.append(f"{r['method']}@{r['sparsity']}:{r['persona']}")
            r.update({k: None for k in FIDELITY})
            continue
        f = rejudge(tok, dense["prompt"], own["detail"], dense["detail"])
        r.update({k: f[k] for k in FIDELITY})
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k) for k in fields} for r in rows)
    note = ("every row's persona measures recomputed from its kept answers under the rules of this date"
            + (f"; without kept answers, and so without persona measures now: {', '.join(dropped)}" if dropped else ""))
    print(note, flush=True)
    report_only(a, rescored={"date": time.strftime("%Y-%m-%d"), "rescore": True, "note": note, "seconds": 0,
                             "methods": "", "personas": "", "sparsities": "", "merge": True})
