"""Persona-Pruner with given options on eval personas: persona/general KL on their eval questions.

    .venv/bin/python benchmarks/data_probe.py PERSONAS SPARSITY OPTIONS_JSON TAG
    .venv/bin/python benchmarks/data_probe.py 0,3 0.25 '{"profile": "default", "relative": false}' plain

Prints one PROBE json line per persona. For comparing settings of the method quickly (the full
table with every baseline is `quality.py`); results are in docs/quality_experiments.md.
"""
import sys, time, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
from quality import dense_answers, EVAL
from pruning.evaluate import Evaluator, load_eval_file
from pruning.batching import kept_masks
from pruning.export import keep_count, select_kept
from pruning.model_io import load_model
from pruning.methods import get_method, PruneContext
if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]; s = float(sys.argv[2]); opts = json.loads(sys.argv[3]); tag = sys.argv[4]
    base = Path.home() / ".local/share/npc/models/smollm2-135m-instruct"
    work = ROOT / ".bench" / "quality"
    model, tok = load_model(base, dtype=torch.float32)
    k = keep_count(model.config.intermediate_size, s)
    sets = {}
    for u in range(10):
        sp = load_eval_file(EVAL / f"persona_alpaca_specific_user_{u}.json")
        gen = load_eval_file(EVAL / f"persona_alpaca_general_user_{u}.json", with_persona=False)
        sets[f"spec{u}"] = {"system": sp.system, "questions": sp.questions}
        sets[f"gen{u}"] = {"system": None, "questions": gen.questions}
    A = dense_answers(base, sets, 96, work, "vllm")
    for u in us:
        sp = load_eval_file(EVAL / f"persona_alpaca_specific_user_{u}.json")
        gen = load_eval_file(EVAL / f"persona_alpaca_general_user_{u}.json", with_persona=False)
        pa, ga = A[f"spec{u}"], A[f"gen{u}"]
        evp = Evaluator(model, tok, sp.system, sp.questions, answers=[x[0] for x in pa], finished=[x[1] for x in pa])
        evg = Evaluator(model, tok, None, gen.questions, answers=[x[0] for x in ga], finished=[x[1] for x in ga])
        t = time.time()
        ctx = PruneContext(persona=sp.persona or sp.system, system_prompt=sp.system, sparsity=s, seed=0,
                           options=opts, cache_dir=work / "cache")
        scores = get_method("persona-pruner")(model, tok, ctx)
        dt = time.time() - t
        m = kept_masks(model, select_kept(scores, k))
        rp, rg = evp.score(m), evg.score(m)
        info = ctx.info.get("persona_pruner", {})
        print("PROBE", json.dumps({"tag": tag, "persona": u, "s": s, "persona_kl": round(rp["kl_to_dense"], 4),
              "general_kl": round(rg["kl_to_dense"], 4), "sec": round(dt), "opts": opts,
              "cached": info.get("dataset_cached")}), flush=True)
