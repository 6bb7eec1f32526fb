"""Which own answers carry a model's judge margin: the dense base's and a depth-pruned model's
greedy answers to one eval persona's questions, each with its margin (nats/token), the highest first.

    .venv/bin/python -m benchmarks.experiments.recital_probe 1 [--sparsity 0.25] [--top 4]

Uses the depth scores `benchmarks/quality.py` cached in .bench/quality (scored here if absent).
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks import ROOT, default_base
from benchmarks.quality import EVAL, eval_pair
from pruning.checkpoint import drop_layers_inplace
from pruning.datasets import calibration_prompts, load_reference_personas
from pruning.eval.persona import judge_answers, persona_prompts
from pruning.generate.hf import generate_detailed
from pruning.methods import PruneContext, get_method, layers_to_drop
from pruning.model_io import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("persona", type=int)
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--top", type=int, default=4)
    a = ap.parse_args()
    model, tok = load_model(default_base(), dtype=torch.float32)
    sp, _ = eval_pair(EVAL, a.persona, None)
    sys_u, refs = persona_prompts(sp.system, sp.persona, load_reference_personas())
    refs, qs = refs[:8], sp.questions[:20]  # as benchmarks/quality.py's judge measures
    cached = ROOT / ".bench" / "quality" / "scores-depth.pt"
    scores = (torch.load(cached, weights_only=False) if cached.is_file()
              else get_method("depth")(model, tok, PruneContext(persona="-", calibration=calibration_prompts(32))))
    pruned = copy.deepcopy(model)
    drop_layers_inplace(pruned, layers_to_drop(model, scores, a.sparsity))
    for name, m in (("dense", model), ("depth", pruned)):
        own = generate_detailed(m, tok, sys_u, qs, 64)
        j = judge_answers(model, tok, sys_u, refs, qs, [x for x, _ in own], [f for _, f in own])
        print(f"== {name}: mean margin {sum(j.margins) / len(j.margins):.4f}, loops {sum(j.degenerate):.0f}/{len(qs)}")
        for (text, _), margin in sorted(zip(own, j.margins), key=lambda x: -x[1])[: a.top]:
            print(f"  {margin:6.3f} | {text[:160]!r}")
    print("persona:", (sp.persona or sp.system)[:300])


if __name__ == "__main__":
    main()
