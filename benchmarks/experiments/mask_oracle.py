"""How low can a channel mask go, and how well does it generalise? (an experiment, not a method)

    .venv/bin/python -m benchmarks.experiments.mask_oracle PERSONA SPARSITY STEPS

Learns a mask (default-profile settings, act-fisher init) on the evaluation answers themselves:
once on all 20 questions (an oracle: train = test), once on the first 10, scored on all 20 and on
the held-out last 10. Prints one ORACLE json line per variant.
"""
import sys, time, json
import torch
from benchmarks import ROOT, default_base
from benchmarks.quality import dense_answers, eval_pair, EVAL
from pruning.checkpoint import keep_count, select_kept
from pruning.eval.metrics import Evaluator
from pruning.methods.persona_pruner.masklearn import learn_scores
from pruning.model_io import load_model
from pruning.options import config_for
from pruning.prefix_forward import make_examples, kept_masks
u, s, steps = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
base = default_base()
work = ROOT / ".bench" / "quality"
sp, _ = eval_pair(EVAL, u)
ans = dense_answers(base, {f"spec{u}": {"system": sp.system, "questions": sp.questions}}, 96, work, "vllm")[f"spec{u}"]
model, tok = load_model(base, dtype=torch.float32)
evp = Evaluator(model, tok, sp.system, sp.questions, answers=[x[0] for x in ans], finished=[x[1] for x in ans])
k = keep_count(model.config.intermediate_size, s)
def kl(scores): return evp.score(kept_masks(model, select_kept(scores, k)))["kl_to_dense"]
half = len(sp.questions) // 2
for name, idx in [("all20", list(range(len(sp.questions)))), ("first10", list(range(half)))]:
    ex = make_examples(tok, sp.system, [sp.questions[i] for i in idx], [ans[i][0] for i in idx], [ans[i][1] for i in idx], max_length=512)
    t = time.time()
    res = learn_scores(model, tok, ex, k, config_for("default", steps=steps), log_every=10)
    held = Evaluator(model, tok, sp.system, sp.questions[half:], answers=[x[0] for x in ans[half:]], finished=[x[1] for x in ans[half:]])
    hk = lambda sc, held=held: held.score(kept_masks(model, select_kept(sc, k)))["kl_to_dense"]
    print("ORACLE", json.dumps({"persona": u, "s": s, "train": name, "steps": steps, "init_kl_all": kl(res.init_scores), "learned_kl_all": kl(res.scores),
          "init_kl_last10": hk(res.init_scores), "learned_kl_last10": hk(res.scores), "sec": round(time.time() - t)}), flush=True)
