"""What `persona.retention` gives a model that *is* the dense base: the measure's own floor.

The judge compares a model's greedy answers with the dense base's on 20 questions. Greedy text
parts at the first near-tie, and from there the answer is another draw; the cap (each answer at
the dense base's best) and the degeneracy guard then act on one side only. So a model that
differs from the dense base by rounding alone need not score 1. This probe measures that, with
the settings of `benchmarks/quality.py` (fp32 dense reference, 64 tokens, 20 specific
questions, the first 8 shipped references), for two copies of the dense base:

- `bf16`: the same weights in bfloat16 (what the serving engines run);
- `batch4`: the fp32 model itself, its answers generated in batches of 4 instead of 16 (the same
  model and weights; only the padding and so the summation order differ).

    .venv/bin/python -m benchmarks.experiments.measure_floor [--personas all] [--eval-dir D] [--out F]

Prints one FLOOR line per (variant, persona) and one mean per variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from benchmarks import default_base
from benchmarks.quality import EVAL, eval_pair, eval_personas
from pruning.datasets import load_reference_personas
from pruning.eval.persona import dense_reference, persona_fidelity, persona_prompts
from pruning.generate.hf import generate_detailed
from pruning.model_io import load_model

KEYS = ("retention", "judge_top1", "degenerate", "pmi_retention")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", default=str(EVAL), help="folder of persona_alpaca_*_user_N.json pairs")
    ap.add_argument("--personas", default="all")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--references", type=int, default=8)
    ap.add_argument("--variants", default="bf16,batch4")
    ap.add_argument("--out", default=None, help="a JSON file for every row")
    a = ap.parse_args()
    eval_dir = Path(a.eval_dir)
    personas = eval_personas(eval_dir, a.personas)
    model, tok = load_model(default_base(), dtype=torch.float32)
    variants = a.variants.split(",")
    bf16 = copy.deepcopy(model).to(torch.bfloat16) if "bf16" in variants else None
    refs = load_reference_personas()
    rows = []
    for u in personas:
        sp, _ = eval_pair(eval_dir, u)
        qs = sp.questions[: a.questions]
        sys_u, sys_refs = persona_prompts(sp.system, sp.persona, refs)
        sys_refs = sys_refs[: a.references]
        ref = dense_reference(model, tok, sys_u, sys_refs, qs, generate_detailed(model, tok, sys_u, qs, a.tokens))
        for name in variants:
            m, batch = {"bf16": (bf16, 16), "batch4": (model, 4)}[name]
            own = generate_detailed(m, tok, sys_u, qs, a.tokens, batch_size=batch)
            f = persona_fidelity(model, tok, sys_u, sys_refs, qs, ref.answers, own, reference=ref,
                                 model=None if m is model else m)
            same = sum(x[0] == y[0] for x, y in zip(own, ref.answers))
            row = {"variant": name, "persona": u, "same_answers": same, **{k: f[k] for k in KEYS}}
            rows.append(row)
            print("FLOOR", json.dumps(row), flush=True)
    for name in variants:
        rs = [r for r in rows if r["variant"] == name]
        mean = {k: round(statistics.mean(r[k] for r in rs), 3) for k in (*KEYS, "same_answers")}
        mean["retention_median"] = round(statistics.median(r["retention"] for r in rs), 3)
        print("FLOOR", json.dumps({"variant": name, "personas": len(rs), **mean}), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
