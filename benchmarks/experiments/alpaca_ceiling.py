"""How low can persona-pruner go with Alpaca-style training questions? (an experiment, not a method)

    .venv/bin/python -m benchmarks.experiments.alpaca_ceiling PERSONAS [VARIANTS]

For persona u, the training questions are the shared eval files' questions that u is never asked
(the ten pairs share most questions: 97 distinct, 57 outside any one persona's pair), in the
evaluation's Alpaca style (`clean`), or as many random instructions from the shipped pool (`pool`).
Each is asked under u's system prompt and answered greedily by the dense model at 96 tokens, or cut
to 64. The default profile's learning (16 mask steps, 32 scale steps, bf16) runs on it and is
scored on u's 20 persona and 20 general questions: a bound on what Alpaca-like questions and longer
answers could give. VARIANTS: comma-separated of clean96, pool96, clean64, pool64 (default: the
first two). Results are in docs/quality_experiments.md.
Prints one CEILING json line per persona and variant.
"""
import sys, time, json, random
import torch
from benchmarks import ROOT, default_base
from benchmarks.quality import dense_answers, eval_pair, EVAL
from benchmarks.experiments.probe_common import setup, evaluators, score_kl, score_masks
from pruning.checkpoint import keep_count, select_kept
from pruning.datasets import load_instructions
from pruning.methods.persona_pruner.masklearn import learn_scores
from pruning.methods.persona_pruner.precision import in_precision
from pruning.options import config_for
from pruning.prefix_forward import make_examples, kept_masks

if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]
    variants = (sys.argv[2] if len(sys.argv) > 2 else "clean96,pool96").split(",")
    model, tok, answers = setup()
    k = keep_count(model.config.intermediate_size, 0.25)
    pool = load_instructions()
    pairs = [eval_pair(EVAL, v) for v in range(10)]
    # the eval pairs share most questions across personas (97 distinct in all)
    every_q = {q for pair in pairs for f in pair for q in f.questions}
    for u in us:
        sp, evp, evg = evaluators(model, tok, u, answers)
        clean = sorted(every_q - {q for f in pairs[u] for q in f.questions})  # the ones u is never asked
        rand = random.Random(0).sample(pool, len(clean))
        work_dir = ROOT / ".bench" / "ceiling" / f"p{u}"  # dense_answers keeps one spec file per folder
        work_dir.mkdir(parents=True, exist_ok=True)
        tr = dense_answers(default_base(), {"clean": {"system": sp.system, "questions": clean},
                                  "pool": {"system": sp.system, "questions": rand}}, 96, work_dir, "vllm")
        for var in variants:
            name, cut = var[:-2], int(var[-2:])
            qs, ans = {"clean": clean, "pool": rand}[name], tr[name]
            ids = [tok(a[0], add_special_tokens=False)["input_ids"] for a in ans]
            ex = make_examples(tok, sp.system, qs, [tok.decode(i[:cut]) for i in ids],
                               [a[1] and len(i) <= cut for a, i in zip(ans, ids)], max_length=512)
            t = time.time()
            with in_precision(model, torch.bfloat16) as work:  # the method's working precision on this CPU
                res = learn_scores(work, tok, ex, k, config_for("default", seed=0), log_every=8)
            plain, init = score_kl(model, evp, evg, res.scores, k), score_kl(model, evp, evg, res.init_scores, k)
            masks = kept_masks(model, select_kept(res.scores, k))
            scaled = score_masks(evp, evg, [m * s.float() for m, s in zip(masks, res.scales)])
            print("CEILING", json.dumps({"persona": u, "variant": var, "examples": len(ex), "init": init,
                                         "mask": plain, "mask_scales": scaled, "sec": round(time.time() - t)}), flush=True)
