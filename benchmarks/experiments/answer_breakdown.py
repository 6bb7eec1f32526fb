"""Where a model's judge retention goes, from the answers a quality run kept
(`docs/quality_answers.jsonl`, no model needed): the share of degenerate answers (loops, recitals),
the margin of the answers that are not, and what retention would be if each degenerate answer
scored the dense base's margin on that question instead of 0.

    .venv/bin/python -m benchmarks.experiments.answer_breakdown [--out docs] [--sparsity 0.25]

Prints one BREAKDOWN line per method (means over personas) and one per (method, persona).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks import ROOT, default_base
from benchmarks.quality_answers import stored
from pruning.eval.persona import judged_detail, retention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--sparsity", type=float, default=0.25)
    a = ap.parse_args()
    recs = stored(Path(a.out))
    tok = AutoTokenizer.from_pretrained(default_base())
    per: dict[str, list[dict]] = {}
    for (u, m, s), rec in sorted(recs.items()):
        if m == "dense" or s != a.sparsity or (u, "dense", 0.0) not in recs:
            continue
        dense_rec = recs[(u, "dense", 0.0)]
        d = judged_detail(tok, dense_rec["detail"], dense_rec["prompt"])
        j = judged_detail(tok, rec["detail"], dense_rec["prompt"])
        cap = max(d.margins)
        den = sum(d.margins)
        ok = [i for i, x in enumerate(j.degenerate) if not x]
        both = [i for i in ok if not d.degenerate[i]]
        row = {"method": m, "persona": u, "degenerate": sum(j.degenerate) / len(j.degenerate),
               "recital": sum(j.recital) / len(j.recital),
               "retention": retention(j.margins, d.margins)["retention"],
               # each degenerate answer given the dense margin on its question instead of 0
               "retention_if_no_degenerate": sum(min(j.margins[i], cap) if not j.degenerate[i] else d.margins[i]
                                                 for i in range(len(j.margins))) / den,
               # on the questions where neither model is degenerate: model margin / dense margin
               "paired_ratio": (sum(min(j.margins[i], cap) for i in both) / sum(d.margins[i] for i in both)
                                if both and sum(d.margins[i] for i in both) else None),
               "top1_of_sound": sum(j.top1[i] for i in ok) / len(ok) if ok else None}
        per.setdefault(m, []).append(row)
        print("BREAKDOWN", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    for m, rows in per.items():
        mean = {k: round(sum(r[k] for r in rows if r[k] is not None) / max(1, sum(r[k] is not None for r in rows)), 3)
                for k in rows[0] if k not in ("method", "persona")}
        print("BREAKDOWN", json.dumps({"method": m, "personas": len(rows), **mean}))


if __name__ == "__main__":
    main()
