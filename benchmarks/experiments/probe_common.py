"""Shared setup of the dev probes: the base model, the cached dense answers, per-persona evaluators."""
import time
from types import SimpleNamespace

import torch

from benchmarks import ROOT, default_base
from benchmarks.quality import EVAL, dense_answers, eval_pair, persona_context
from pruning.checkpoint import keep_count, select_kept
from pruning.eval.metrics import Evaluator
from pruning.generate import vllm_engine
from pruning.methods.persona_pruner.data import persona_examples
from pruning.model_io import load_model
from pruning.prefix_forward import kept_masks

WORK = ROOT / ".bench" / "quality"


def setup():
    """(model, tok, answers): the fp32 base and the dense answers of all 10 personas (vLLM, cached)."""
    base = default_base()
    model, tok = load_model(base, dtype=torch.float32)
    WORK.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no benchmark cache yet
    sets = {}
    for u in range(10):
        sp, gen = eval_pair(EVAL, u)
        sets[f"spec{u}"] = {"system": sp.system, "questions": sp.questions}
        sets[f"gen{u}"] = {"system": None, "questions": gen.questions}
    return model, tok, dense_answers(base, sets, 96, WORK, "vllm")


def evaluators(model, tok, u: int, answers):
    """(eval set, persona evaluator, general evaluator) of persona `u`."""
    sp, gen = eval_pair(EVAL, u)
    pa, ga = answers[f"spec{u}"], answers[f"gen{u}"]
    evp = Evaluator(model, tok, sp.system, sp.questions, answers=[x[0] for x in pa], finished=[x[1] for x in pa])
    evg = Evaluator(model, tok, None, gen.questions, answers=[x[0] for x in ga], finished=[x[1] for x in ga])
    return sp, evp, evg


def score_masks(evp, evg, masks, model=None) -> dict:
    """Persona and general KL under per-layer channel multipliers (0/1 masks, or scaled ones), of
    the evaluators' dense model or of another `model` (e.g. one with changed weights)."""
    masks = [m.float() for m in masks]
    return {"persona_kl": round(evp.score(masks, model=model)["kl_to_dense"], 4),
            "general_kl": round(evg.score(masks, model=model)["kl_to_dense"], 4)}


def score_kl(model, evp, evg, scores, k: int) -> dict:
    """Persona and general KL of the per-layer top-k of `scores`."""
    return score_masks(evp, evg, kept_masks(model, select_kept(list(scores), k)))


def persona_runs(us: list[int], data_options: dict | None = None, sparsity: float = 0.25):
    """Per persona in `us`, a run: its evaluators and its synthetic set as persona-pruner builds it
    (`persona_examples`: built or cached with `data_options`), with `run.work` the model in the
    method's working precision while the run is current. Score after the loop: the evaluators use
    the fp32 model, which `run.work` may be, cast in place, until the next run starts.

    run: u, sp, evp, evg, model (fp32), work, tok, ctx, examples, info, k, data_s
    """
    model, tok, answers = setup()
    k = keep_count(model.config.intermediate_size, sparsity)
    for u in us:
        sp, evp, evg = evaluators(model, tok, u, answers)
        ctx = persona_context(sp, sparsity, data_options or {}, WORK)
        t = time.time()
        with persona_examples(model, tok, ctx) as (work, examples, _opts, info):
            vllm_engine.release()  # a kept teacher engine (teacher_backend "vllm") is not needed now
            yield SimpleNamespace(u=u, sp=sp, evp=evp, evg=evg, model=model, work=work, tok=tok, ctx=ctx,
                                  examples=examples, info=info, k=k, data_s=round(time.time() - t))
