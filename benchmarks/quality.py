"""Role-play fidelity of every pruning method against the dense base (the paper's Table 1, locally).

    .venv/bin/python -m benchmarks.quality            # 10 personas x {0.25, 0.5} x every method

For each persona of ../shared/data/eval (specific questions with its system prompt, general
questions without one) the dense model's greedy answers are generated once with vLLM, then every
method's mask is scored teacher-forced: persona KL(dense || pruned) and NLL, general KL and NLL,
and attribution of the pruned model's own answers (all-MiniLM-L6-v2). Persona-independent
methods are scored once; activation-prompt, activation-persona and persona-pruner per persona
(activation-persona and persona-pruner share the persona's synthetic set). Writes
docs/quality.md, docs/quality.csv and PNG plots; rows are appended to the CSV as they finish.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import ROOT, default_base
from benchmarks import quality_answers
from benchmarks.quality_report import (FIDELITY, GENERIC, PERSONAL, append_row, read_rows, stored_runs, plot,
                                       report_only, summarize, write_md)
from pruning.checkpoint import drop_layers_inplace, keep_count, select_kept
from pruning.core import allowed_masks, inside, read_core
from pruning.datasets import calibration_prompts, load_reference_personas
from pruning.eval.attribution import attribution
from pruning.eval.metrics import Evaluator, load_eval_file
from pruning.eval.persona import dense_reference, persona_fidelity, persona_prompts
from pruning.generate.hf import generate_detailed
from pruning.methods import LayerScores, PruneContext, get_method, layers_to_drop
from pruning.model_io import load_model
from pruning.prefix_forward import channel_mask, kept_masks

EVAL = ROOT.parent / "shared" / "data" / "eval"


def gen_dense(base: str, spec: str, out: str, max_new_tokens: int) -> None:
    """Subprocess mode: the dense model's greedy answers for every set, with vLLM."""
    from pruning.generate import vllm_engine

    sets = json.loads(Path(spec).read_text())["sets"]
    result = {}
    for name, s in sets.items():
        result[name] = vllm_engine.answers(base, s["system"], s["questions"], max_new_tokens)
    Path(out).write_text(json.dumps(result))
    vllm_engine.release()


def eval_pair(eval_dir: Path, u: int, limit: int | None = None):
    """(persona set, general set) of persona `u`: its specific questions with the persona's system
    prompt, and its general questions without one (the first `limit` of each)."""
    return (load_eval_file(eval_dir / f"persona_alpaca_specific_user_{u}.json", limit=limit),
            load_eval_file(eval_dir / f"persona_alpaca_general_user_{u}.json", with_persona=False, limit=limit))


def persona_context(sp, sparsity: float, options: dict, work: Path, seed: int = 0) -> PruneContext:
    """The persona-pruner (and activation-persona) context of eval set `sp`: its synthetic data
    cached under the benchmark's `work` folder."""
    return PruneContext(persona=sp.persona or sp.system, system_prompt=sp.system, sparsity=sparsity, seed=seed,
                        options=options, cache_dir=work / "cache")


def eval_personas(eval_dir: Path, which: str) -> list[int]:
    """The persona numbers to run: `which` ("all", or "0,3,7") checked against the eval dir's pairs."""
    have = sorted(int(m.group(1)) for f in eval_dir.glob("persona_alpaca_specific_user_*.json")
                  if (m := re.fullmatch(r"persona_alpaca_specific_user_(\d+)\.json", f.name))
                  and (eval_dir / f"persona_alpaca_general_user_{m.group(1)}.json").is_file())
    if which == "all":
        if not have:
            raise SystemExit(f"no persona_alpaca_specific/general_user_N.json pairs in {eval_dir}")
        return have
    want = [int(x) for x in which.split(",")]
    missing = [u for u in want if u not in have]
    if missing:
        raise SystemExit(f"no specific+general eval pair for persona(s) {missing} in {eval_dir}")
    return want


def dense_answers(base: Path, sets: dict, max_new_tokens: int, work: Path, backend: str) -> dict:
    if backend == "hf":
        model, tok = load_model(base, dtype=torch.bfloat16)
        return {n: generate_detailed(model, tok, s["system"], s["questions"], max_new_tokens) for n, s in sets.items()}
    spec, out = work / "dense_sets.json", work / "dense_answers.json"
    if out.is_file() and spec.is_file():  # a rerun over some of the same sets
        old = json.loads(spec.read_text())
        if old["max_new_tokens"] == max_new_tokens and all(old["sets"].get(k) == v for k, v in sets.items()):
            return {k: [tuple(x) for x in v] for k, v in json.loads(out.read_text()).items() if k in sets}
    spec.write_text(json.dumps({"sets": sets, "max_new_tokens": max_new_tokens}))
    # its own process: vLLM's CPU thread binding must not leak into the torch work that follows
    subprocess.run([sys.executable, "-m", "benchmarks.quality", "--gen-dense", str(base), str(spec), str(out),
                    str(max_new_tokens)], check=True, cwd=ROOT)
    return {k: [tuple(x) for x in v] for k, v in json.loads(out.read_text()).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen-dense", nargs=4, metavar=("BASE", "SPEC", "OUT", "TOKENS"))
    ap.add_argument("--base", default=None, help="base model directory (default: the installed default model)")
    ap.add_argument("--eval-dir", default=str(EVAL),
                    help="folder of persona_alpaca_{specific,general}_user_N.json pairs (default: shared/data/eval)")
    ap.add_argument("--personas", default="all", help="comma-separated N of the eval dir's pairs, or all")
    ap.add_argument("--sparsities", default="0.25,0.5")
    ap.add_argument("--methods", default=",".join(GENERIC + PERSONAL))
    ap.add_argument("--profile", default="default")
    ap.add_argument("--seed", type=int, default=0,
                    help="the persona methods' seed (their data's samples and the mask's learning): the method's own noise")
    ap.add_argument("--options", default="{}", help="JSON: persona-pruner (and activation-persona) options over the profile")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--questions", type=int, default=None, help="the first N questions of each set (default: all)")
    ap.add_argument("--attribution-n", type=int, default=8, help="questions per persona for attribution (0: off)")
    ap.add_argument("--attribution-sparsities", default="0.25")
    ap.add_argument("--fidelity-n", type=int, default=20,
                    help="questions per persona for the judge measures (retention, top-1, PMI; 0: off)")
    ap.add_argument("--fidelity-tokens", type=int, default=64, help="tokens of each own answer the judge scores")
    ap.add_argument("--fidelity-references", type=int, default=8,
                    help="reference personas the judge weighs each answer against (the first N shipped; "
                         "every one costs a pass over the answers per model)")
    ap.add_argument("--core", default=None,
                    help="a core's model dir (`npc models core`): every method prunes within it, as the server "
                         "prunes that core's NPCs (persona-pruner learns inside it; judged against the dense base)")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--out", default=None, help="report folder (default: docs/, or the work folder for another --eval-dir)")
    ap.add_argument("--work", default=None, help="cache folder (default: .bench/quality, one per --eval-dir)")
    ap.add_argument("--budget-s", type=float, default=0, help="start no new persona after this many seconds")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from quality.csv")
    ap.add_argument("--rescore", action="store_true",
                    help="recompute the persona measures of every row from its stored answers (quality_answers.jsonl) "
                         "under today's rules, then the report")
    ap.add_argument("--merge", action="store_true",
                    help="keep the stored rows of every (persona, sparsity, method) this run does not redo "
                         "(e.g. rerun persona-pruner after a change against the stored baselines)")
    ap.add_argument("--note", default="", help="why this run was made (kept in the report's run log)")
    a = ap.parse_args()
    a.options = json.loads(a.options)
    if a.gen_dense:
        gen_dense(a.gen_dense[0], a.gen_dense[1], a.gen_dense[2], int(a.gen_dense[3]))
        return
    a.base = a.base or str(default_base())
    core = read_core(a.core) if a.core else None
    if a.core and core is None:
        raise SystemExit(f"{a.core} is not a core (no core.json)")
    if core is not None and Path(a.base).resolve() != core.dense_dir.resolve():
        raise SystemExit(f"the core {a.core} was cut from {core.dense_dir}, not from --base {a.base}")
    if core is not None and "depth" in a.methods.split(","):
        raise SystemExit("depth pruning drops whole blocks and cannot run within a core")
    eval_dir = Path(a.eval_dir).expanduser().resolve()
    default_eval = eval_dir == EVAL.resolve()
    if a.work is None:
        tag = hashlib.sha256(str(eval_dir).encode()).hexdigest()[:8]
        a.work = str(ROOT / ".bench" / "quality" / ("" if default_eval else f"eval-{eval_dir.name}-{tag}"))
    if a.out is None and a.core:  # never merged into the dense base's report
        a.out = str(Path(a.work) / f"core-{Path(a.core).name}")
    elif a.out is None:
        a.out = str(ROOT / "docs") if default_eval else a.work
    if a.report_only:
        return report_only(a)
    if a.rescore:
        return quality_answers.rescore(a)

    t_start = time.time()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(a.base)
    personas = eval_personas(eval_dir, a.personas)
    sparsities = [float(x) for x in a.sparsities.split(",")]
    attr_sp = {float(x) for x in a.attribution_sparsities.split(",") if x}
    methods = a.methods.split(",")
    refs = load_reference_personas()

    sets, evals = {}, {}
    for u in personas:
        sp, gen = eval_pair(eval_dir, u, a.questions)
        evals[u] = (sp, gen)
        sets[f"spec{u}"] = {"system": sp.system, "questions": sp.questions}
        sets[f"gen{u}"] = {"system": None, "questions": gen.questions}
    t0 = time.time()
    answers = dense_answers(base, sets, a.max_new_tokens, work, a.backend)
    print(f"dense answers for {len(sets)} sets in {time.time() - t0:.0f}s ({a.backend})", flush=True)

    model, tok = load_model(base, dtype=torch.float32)
    dense_size = model.config.intermediate_size
    allowed = allowed_masks(core, dense_size) if core is not None else None
    generic_scores = {}
    for m in [m for m in methods if m in GENERIC]:
        t = time.time()
        cached = work / f"scores-{m}.pt"  # persona-independent: reused by reruns
        if cached.is_file():
            generic_scores[m] = torch.load(cached, weights_only=False)
            continue
        generic_scores[m] = get_method(m)(model, tok, PruneContext(persona="-", calibration=calibration_prompts(32)))
        torch.save(generic_scores[m], cached)
        print(f"{m}: scored in {time.time() - t:.1f}s", flush=True)

    csv_path = out / "quality.csv"
    # a core's run keeps its own prune times beside its own report
    pt_path = work / "prune_times.json" if core is None else out / "prune_times.json"
    fields = ["persona", "method", "sparsity", "persona_kl", "persona_nll", "persona_nll_dense", "general_kl",
              "general_nll", "general_nll_dense", "attribution", *FIDELITY, "seconds"]
    rows: list[dict] = []
    prune_times: list[dict] = []
    if not a.merge:
        (out / quality_answers.ANSWERS).unlink(missing_ok=True)
    if a.merge and csv_path.is_file():
        rows = read_rows(csv_path)  # a stored row goes when this run writes its (persona, sparsity, method)
        if pt_path.is_file():  # persona-pruner's stored prune times (those this run redoes go in `redo`)
            prune_times = json.loads(pt_path.read_text())
        print(f"merge: keeping {len(rows)} stored rows", flush=True)

    def write_csv() -> None:
        with open(csv_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()
        for r in rows:
            append_row(csv_path, fields, r)

    def redo(u: int, s: float) -> None:
        """Drop the stored rows this persona and sparsity are about to replace: a run stopped by its
        budget keeps what it never reached."""
        gone = {(u, s, m) for m in methods} | ({(u, 0.0, "dense")} if s == sparsities[0] else set())
        rows[:] = [r for r in rows if (r["persona"], r["sparsity"], r["method"]) not in gone]
        if "persona-pruner" in methods:
            prune_times[:] = [p for p in prune_times if (p["persona"], p["sparsity"]) != (u, s)]
        write_csv()

    write_csv()

    def pruned_view(kind, data, scales=None):
        """A context giving the pruned model: channel masks on the dense model (times the method's
        channel scales, if any: the exported model folds them into down_proj), or a depth copy."""
        if kind == "kept":
            masks = kept_masks(model, data)
            return model, masks if scales is None else [m * sc.float() for m, sc in zip(masks, scales)]
        m2 = copy.deepcopy(model)
        drop_layers_inplace(m2, data)
        return m2, None

    def run_persona(u: int, s: float) -> None:
        redo(u, s)
        sp, gen = evals[u]
        pa, ga = answers[f"spec{u}"], answers[f"gen{u}"]
        evp = Evaluator(model, tok, sp.system, sp.questions, answers=[x[0] for x in pa], finished=[x[1] for x in pa])
        evg = Evaluator(model, tok, None, gen.questions, answers=[x[0] for x in ga], finished=[x[1] for x in ga])
        who = sp.persona or sp.system
        fid_qs = sp.questions[: a.fidelity_n]
        sys_u, sys_refs = persona_prompts(sp.system, sp.persona, refs)
        sys_refs = sys_refs[: a.fidelity_references]
        dense_fid, fid_ref = {}, None
        if fid_qs:
            fid_ref = dense_reference(model, tok, sys_u, sys_refs, fid_qs,
                                      generate_detailed(model, tok, sys_u, fid_qs, a.fidelity_tokens))
            dense_fid = persona_fidelity(model, tok, sys_u, sys_refs, fid_qs, fid_ref.answers, fid_ref.answers,
                                         reference=fid_ref, detail=True)
            quality_answers.keep(out, u, "dense", 0.0, dense_fid["detail"], prompt=sys_u)

        def fidelity(pm, masks, method) -> dict:
            if fid_ref is None:
                return {}
            with channel_mask(pm, masks):
                own = generate_detailed(pm, tok, sys_u, fid_qs, a.fidelity_tokens)
            f = persona_fidelity(model, tok, sys_u, sys_refs, fid_qs, fid_ref.answers, own, reference=fid_ref,
                                 model=None if pm is model else pm, masks=masks if pm is model else None,
                                 detail=True)
            quality_answers.keep(out, u, method, s, f["detail"])
            return {k: f[k] for k in FIDELITY}

        dense_attr = attribution([x[0] for x in pa[: a.attribution_n]], who, refs)["attribution"] if a.attribution_n else None
        if s == sparsities[0]:
            rows.append(dict(persona=u, method="dense", sparsity=0.0, persona_kl=0.0, persona_nll=evp.dense_nll,
                         persona_nll_dense=evp.dense_nll, general_kl=0.0, general_nll=evg.dense_nll,
                             general_nll_dense=evg.dense_nll, attribution=dense_attr, seconds=0.0,
                             **{k: dense_fid[k] for k in FIDELITY if k in dense_fid}))
            append_row(csv_path, fields, rows[-1])
        persona_scores = {}
        k = keep_count(dense_size, s)
        # persona-pruner before activation-persona: the one that comes first builds the shared
        # synthetic set, and the prune time reported is persona-pruner's
        for m in sorted(methods, key=lambda m: m == "activation-persona"):
            t = time.time()
            scales = None
            if m in generic_scores:
                scores = generic_scores[m]
            elif m == "activation-prompt":
                if m not in persona_scores:
                    persona_scores[m] = get_method(m)(model, tok, PruneContext(
                        persona=sp.system, calibration=calibration_prompts(32)))
                scores = persona_scores[m]
            elif m == "activation-persona":  # persona-pruner's synthetic set (cached), no learning
                if m not in persona_scores:
                    ctx = persona_context(sp, s, {**a.options, "profile": a.profile}, work, a.seed)
                    persona_scores[m] = get_method(m)(model, tok, ctx)
                scores = persona_scores[m]
            else:  # persona-pruner learns a mask per sparsity; its synthetic data is cached per persona
                ctx = persona_context(sp, s, {**a.options, "profile": a.profile}, work, a.seed)
                ctx.allowed = allowed
                scores = get_method(m)(model, tok, ctx)
                scales = ctx.channel_scales
                info = ctx.info.get("persona_pruner", {})
                prune_times.append({"persona": u, "sparsity": s, "seconds": time.time() - t,
                                    "cached_data": info.get("dataset_cached"), "info": info})
                pt_path.write_text(json.dumps(prune_times))
            if allowed is not None and not isinstance(scores, LayerScores):
                scores = inside(scores, allowed)
            if isinstance(scores, LayerScores):
                kind, data = "drop", layers_to_drop(model, scores, s)
            else:
                kind, data = "kept", select_kept(scores, k)
            pm, masks = pruned_view(kind, data, scales)
            rp, rg = evp.score(masks, model=pm), evg.score(masks, model=pm)
            attr = None
            if a.attribution_n and s in attr_sp:
                with channel_mask(pm, masks):
                    own = generate_detailed(pm, tok, sp.system, sp.questions[: a.attribution_n], 48)
                attr = attribution([x[0] for x in own], who, refs)["attribution"]
            row = dict(persona=u, method=m, sparsity=s, persona_kl=rp["kl_to_dense"], persona_nll=rp["nll"],
                       persona_nll_dense=rp["nll_dense"], general_kl=rg["kl_to_dense"], general_nll=rg["nll"],
                       general_nll_dense=rg["nll_dense"], attribution=attr, **fidelity(pm, masks, m),
                       seconds=round(time.time() - t, 1))
            rows.append(row)
            append_row(csv_path, fields, row)
            print(f"persona {u} s={s} {m:20s} persona KL {row['persona_kl']:.4f} general KL "
                  f"{row['general_kl']:.4f} retention {row.get('retention')} attr {attr} ({row['seconds']}s)",
                  flush=True)
            if pm is not model:
                del pm

    done: list[tuple[float, int]] = []
    # sparsity-major: every persona at the first sparsity before any at the next, so a run
    # cut short by --budget-s still covers the headline sparsity for as many personas as it can
    for s in sparsities:
        for u in personas:
            if a.budget_s and time.time() - t_start > a.budget_s:
                break
            run_persona(u, s)
            done.append((s, u))
    if a.merge:  # the report covers every stored row, not only this run's
        sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
        methods = [m for m in GENERIC + PERSONAL if any(r["method"] == m for r in rows)]
    summary = summarize(rows, sparsities, methods, prune_times)
    summary["total_s"] = None if a.merge else round(time.time() - t_start)
    summary["this_run_s"] = round(time.time() - t_start)
    # the run log travels with merged reports: which run gave which rows
    ran = ",".join(map(str, personas))
    summary["runs"] = (stored_runs(out) if a.merge else []) + [{
        "date": time.strftime("%Y-%m-%d"), "methods": a.methods, "personas": ran,
        "sparsities": a.sparsities, "seconds": summary["this_run_s"], "merge": a.merge, "note": a.note}]
    if a.merge:
        summary["merged"] = {"ran": a.methods, "personas": ran, "sparsities": a.sparsities}
    summary["done"] = [f"{u}@{s}" for s, u in done]
    (out / "quality.json").write_text(json.dumps({"summary": summary, "rows": rows, "prune_times": prune_times},
                                                 indent=1))
    plot(rows, sparsities, methods, out)
    write_md(summary, rows, sparsities, methods, out, a)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
