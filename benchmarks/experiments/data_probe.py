"""Persona-Pruner with given options on eval personas: persona/general KL on their eval questions.

    .venv/bin/python -m benchmarks.experiments.data_probe PERSONAS SPARSITY OPTIONS_JSON TAG
    .venv/bin/python -m benchmarks.experiments.data_probe 0,3 0.25 '{"profile": "default", "relative": false}' plain

Prints one PROBE json line per persona. For comparing settings of the method quickly (the full
table with every baseline is `quality.py`); results are in docs/quality_experiments.md.
"""
import sys, time, json
from benchmarks.experiments.probe_common import WORK, evaluators, persona_context, score_kl, setup
from pruning.checkpoint import keep_count
from pruning.methods import get_method
if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]; s = float(sys.argv[2]); opts = json.loads(sys.argv[3]); tag = sys.argv[4]
    model, tok, A = setup()
    k = keep_count(model.config.intermediate_size, s)
    for u in us:
        sp, evp, evg = evaluators(model, tok, u, A)
        t = time.time()
        ctx = persona_context(sp, s, opts, WORK)
        scores = get_method("persona-pruner")(model, tok, ctx)
        dt = time.time() - t
        kl = score_kl(model, evp, evg, scores, k)
        info = ctx.info.get("persona_pruner", {})
        print("PROBE", json.dumps({"tag": tag, "persona": u, "s": s, **kl, "sec": round(dt), "opts": opts,
              "cached": info.get("dataset_cached")}), flush=True)
