"""Where a pruned model's persona KL sits: by answer position, on end-of-turn, and how concentrated.

    .venv/bin/python -m benchmarks.experiments.kl_positions PERSONA

Compares the default persona-pruner mask with activation-prompt on one eval persona at sparsity
0.25 (dense answers from quality.py's cache). Results are in docs/quality_experiments.md.
"""
import sys, json
import torch
from benchmarks import ROOT, default_base
from benchmarks.quality import eval_pair, persona_context, EVAL
from pruning.checkpoint import keep_count, select_kept
from pruning.datasets import calibration_prompts
from pruning.eval.metrics import Evaluator
from pruning.model_io import load_model
from pruning.methods import PruneContext, get_method
from pruning.prefix_forward import kept_masks
if __name__ == "__main__":
    u = int(sys.argv[1])
    base = default_base()
    work_dir = ROOT / ".bench" / "quality"
    model, tok = load_model(base, dtype=torch.float32)
    k = keep_count(model.config.intermediate_size, 0.25)
    A = json.loads((work_dir / "dense_answers.json").read_text())
    sp, _ = eval_pair(EVAL, u)
    pa = A[f"spec{u}"]
    evp = Evaluator(model, tok, sp.system, sp.questions, answers=[x[0] for x in pa], finished=[x[1] for x in pa])
    print("finished", sum(x[1] for x in pa), "of", len(pa), "tokens", evp.tokens)
    ctx = persona_context(sp, 0.25, {}, work_dir)
    variants = {"persona-pruner": get_method("persona-pruner")(model, tok, ctx),
                "activation-prompt": get_method("activation-prompt")(model, tok, PruneContext(persona=sp.system, calibration=calibration_prompts(32)))}
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for name, sc in variants.items():
        m = kept_masks(model, select_kept(sc, k))
        kls, pos, tg = [], [], []
        for b, (lq, tgt) in enumerate(evp._logps(model, m)):
            lp = evp.dense_logp[b]
            kls.append((lp.exp() * (lp - lq)).sum(-1)); tg.append(tgt)
            for i in evp.batches[b]:
                e = evp.examples[i]; pos += list(range(len(e.ids) - e.n_prompt))
        kl = torch.cat(kls); pos = torch.tensor(pos); tg = torch.cat(tg)
        out = {"mean": round(float(kl.mean()), 4)}
        for lo, hi in [(0, 1), (1, 8), (8, 32), (32, 64), (64, 200)]:
            sel = (pos >= lo) & (pos < hi)
            out[f"pos{lo}-{hi}"] = (round(float(kl[sel].mean()), 3), int(sel.sum()), round(float(kl[sel].sum() / kl.sum()), 3))
        out["eot"] = round(float(kl[tg == eot].mean()), 3) if (tg == eot).any() else None
        s = kl.sort(descending=True).values
        for q in (0.01, 0.05, 0.2):
            out[f"top{q}"] = round(float(s[: max(1, int(q * len(s)))].sum() / s.sum()), 3)
        # dense entropy split
        print(name, json.dumps(out), flush=True)
