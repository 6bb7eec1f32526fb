"""Is each persona's sub-network its own? The cross matrix of persona-pruner masks (paper Fig. 3b).

    .venv/bin/python -m benchmarks.specificity          # 10 shared personas at 0.25 -> docs/specificity.md

Masks (persona-pruner, the given profile; channel scales applied, as export folds them in):
  own:u        learned on persona u's synthetic set (seed 0)
  global       one mask learned on all personas' synthetic sets combined, as many examples in all as
               one persona's set (an equal share of each)
  global-all   one mask on every example of every persona's set (as many per persona as an own mask)
  neutral      the method run for a plain assistant prompt
  own:u@sN     persona u's mask with learning seed N (same data): the seed noise
A cell (mask v, persona u) is mask v answering persona u's questions under u's system prompt:
judge retention (its own greedy answers, scored by the dense base under u's prompt and under the
reference personas', against the dense base's margin on the same questions; see
pruning/eval/persona.py) and persona KL to the dense base (teacher-forced on the dense answers).
The dense base with the prompt is retention 1 and KL 0 by definition.

Resumable: masks are kept under WORK/masks and cells appended to WORK/cells.jsonl; a rerun does
only what is missing. `--budget-s` starts no new mask after that many seconds; the report covers
what is done.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks import ROOT, default_base
from benchmarks.specificity_report import KINDS, write_report
from pruning.checkpoint import keep_count, select_kept
from pruning.datasets import load_reference_personas
from pruning.eval.metrics import Evaluator, load_eval_file
from pruning.eval.persona import dense_reference, judge_answers, persona_prompts, retention
from pruning.generate.hf import generate_detailed
from pruning.methods import PruneContext, get_method
from pruning.methods.persona_pruner.data import persona_examples
from pruning.methods.persona_pruner.masklearn import learn_scores
from pruning.methods.persona_pruner.precision import compute_dtype, in_precision
from pruning.model_io import load_model, model_device
from pruning.options import learn_config, resolve_options
from pruning.prefix_forward import channel_mask, kept_masks

EVAL = ROOT.parent / "shared" / "data" / "eval"
NEUTRAL = "You are a helpful assistant."


class Run:
    """One benchmark run: the dense model, the personas' references, the stored masks and cells."""

    def __init__(self, a):
        self.a = a
        self.work = Path(a.work)
        (self.work / "masks").mkdir(parents=True, exist_ok=True)
        self.cells_path = self.work / "cells.jsonl"
        self.model, self.tok = load_model(Path(a.base), dtype=torch.float32)
        self.k = keep_count(self.model.config.intermediate_size, a.sparsity)
        self.refs = load_reference_personas()[: a.references]
        self.personas = [int(x) for x in a.personas.split(",")] if a.personas != "all" else list(range(10))
        self.sets = {u: load_eval_file(Path(a.eval_dir) / f"persona_alpaca_specific_user_{u}.json")
                     for u in self.personas}
        self.cells = {}
        if self.cells_path.is_file():
            for line in self.cells_path.read_text().splitlines():
                c = json.loads(line)
                self.cells[(c["mask"], c["persona"])] = c
        self._judge_refs: dict[int, tuple] = {}

    # -- masks -------------------------------------------------------------------------------

    def ctx(self, u: int | None, seed: int = 0) -> PruneContext:
        sp = self.sets[u] if u is not None else None
        persona = (sp.persona or sp.system) if sp else NEUTRAL
        return PruneContext(persona=persona, system_prompt=sp.system if sp else NEUTRAL, sparsity=self.a.sparsity,
                            seed=seed, options={"profile": self.a.profile}, cache_dir=Path(self.a.cache))

    def stored(self, name: str):
        p = self.work / "masks" / f"{name.replace(':', '_').replace('@', '_')}.pt"
        return p, (torch.load(p, weights_only=False) if p.is_file() else None)

    def mask(self, name: str, learn) -> list[torch.Tensor]:
        """The mask `name` (0/1 per channel times its learned scale), learned by `learn()` once."""
        p, m = self.stored(name)
        if m is None:
            t = time.time()
            scores, scales, info = learn()
            m = {"kept": select_kept(scores, self.k), "scales": scales, "info": info, "seconds": round(time.time() - t, 1)}
            torch.save(m, p)
            print(f"mask {name}: {m['seconds']} s", flush=True)
        masks = kept_masks(self.model, m["kept"])
        return masks if m["scales"] is None else [x * s.float() for x, s in zip(masks, m["scales"])]

    def learn_method(self, u: int | None, seed: int = 0):
        ctx = self.ctx(u, seed)
        scores = get_method("persona-pruner")(self.model, self.tok, ctx)
        return scores, ctx.channel_scales, ctx.info.get("persona_pruner", {})

    def learn_seed(self, u: int, seed: int):
        """Persona u's own data (seed 0's set), the mask learned with another seed."""
        opts = resolve_options({"profile": self.a.profile})
        with persona_examples(self.model, self.tok, self.ctx(u)) as (work, examples, _, _):
            res = learn_scores(work, self.tok, examples, self.k, learn_config(opts, seed))
        return self._result(res, len(examples))

    def learn_global(self, per_persona: int | None):
        """One mask on every persona's synthetic set: `per_persona` examples of each (all: None)."""
        opts = resolve_options({"profile": self.a.profile})
        pools = []
        for u in self.personas:
            with persona_examples(self.model, self.tok, self.ctx(u)) as (_, examples, _, _):
                pools.append(examples)
        rng = random.Random(0)
        examples = [e for pool in pools for e in (rng.sample(pool, min(per_persona, len(pool)))
                                                  if per_persona else pool)]
        rng.shuffle(examples)
        with in_precision(self.model, compute_dtype(opts["compute_dtype"], model_device(self.model))) as work:
            res = learn_scores(work, self.tok, examples, self.k, learn_config(opts, 0))
        return self._result(res, len(examples))

    @staticmethod
    def _result(res, n: int):
        scales = None if res.scales is None else [x.float().cpu() for x in res.scales]
        return [s.float().cpu() for s in res.scores], scales, {"examples": n, "learn_s": round(res.seconds, 1)}

    def core_mask(self, core_dir: str):
        """The kept channels of a core (`npc models core`) as scores whose top-k they are."""
        from pruning.core import read_core

        info = read_core(core_dir)
        if info is None or abs(info.sparsity - self.a.sparsity) > 1e-9:
            raise SystemExit(f"--core {core_dir}: not a core at sparsity {self.a.sparsity}")
        scores = [torch.zeros(self.model.config.intermediate_size) for _ in info.kept]
        for s, row in zip(scores, info.kept):
            s[list(row)] = 1.0
        return scores, None, {"core": str(core_dir)}

    def own_set_size(self) -> int:
        with persona_examples(self.model, self.tok, self.ctx(self.personas[0])) as (_, examples, _, _):
            return len(examples)

    # -- cells -------------------------------------------------------------------------------

    def judge_ref(self, u: int):
        """Persona u's questions, prompts, dense reference and KL evaluator, computed once."""
        if u not in self._judge_refs:
            sp = self.sets[u]
            qs = sp.questions[: self.a.questions]
            sys_u, sys_refs = persona_prompts(sp.system, sp.persona, self.refs)
            dense = generate_detailed(self.model, self.tok, sys_u, qs, self.a.tokens)
            ref = dense_reference(self.model, self.tok, sys_u, sys_refs, qs, dense)
            ev = Evaluator(self.model, self.tok, sys_u, qs, answers=[x[0] for x in dense],
                           finished=[x[1] for x in dense])
            self._judge_refs[u] = (qs, sys_u, sys_refs, ref, ev)
        return self._judge_refs[u]

    def cell(self, name: str, masks, u: int) -> dict:
        if (name, u) in self.cells:
            return self.cells[(name, u)]
        t = time.time()
        qs, sys_u, sys_refs, ref, ev = self.judge_ref(u)
        with channel_mask(self.model, masks):
            own = generate_detailed(self.model, self.tok, sys_u, qs, self.a.tokens)
        j = judge_answers(self.model, self.tok, sys_u, sys_refs, qs, [x[0] for x in own], [x[1] for x in own])
        c = {"mask": name, "persona": u, **retention(j.margins, ref.judged.margins),
             "judge_top1": round(statistics.fmean(j.top1), 4), "degenerate": round(statistics.fmean(j.degenerate), 4),
             "margins": [round(x, 5) for x in j.margins], "dense_margins": [round(x, 5) for x in ref.judged.margins],
             "kl": round(ev.score(masks)["kl_to_dense"], 5), "seconds": round(time.time() - t, 1)}
        with open(self.cells_path, "a") as f:
            f.write(json.dumps(c) + "\n")
        self.cells[(name, u)] = c
        print(f"cell {name:14s} on persona {u}: retention {c['retention']:.3f} KL {c['kl']:.3f} ({c['seconds']} s)",
              flush=True)
        return c

    def row(self, name: str, learn, personas=None) -> None:
        """Mask `name` on every persona (or on `personas`)."""
        todo = [u for u in (personas if personas is not None else self.personas) if (name, u) not in self.cells]
        if not todo and self.stored(name)[1] is not None:
            return
        masks = self.mask(name, learn)
        for u in todo:
            self.cell(name, masks, u)


def jaccard(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over layers of |A & B| / |A | B| of two kept-channel sets."""
    out = []
    for x, y in zip(a, b):
        sx, sy = set(x.tolist()), set(y.tolist())
        out.append(len(sx & sy) / len(sx | sy))
    return statistics.fmean(out)


def pearson(xs: list[float], ys: list[float]) -> float:
    return statistics.correlation(xs, ys) if len(xs) > 2 else float("nan")


def summarize(run: Run) -> dict:
    """Verdicts on the judge margin (nats/token): within a row every mask shares the persona's dense
    margin, so it ranks as retention does, and across personas it does not blow up where the dense
    margin is near 0 (retention is summarised by its median for that reason)."""
    cells, ps = run.cells, run.personas

    def get(key, name, u):
        c = cells.get((name, u))
        return None if c is None else (statistics.fmean(c["margins"]) if key == "margin" else c[key])

    done = [u for u in ps if (f"own:{u}", u) in cells]
    kinds = KINDS
    rows = {}
    for u in done:
        others = [f"own:{v}" for v in done if v != u and (f"own:{v}", u) in cells]
        r = {}
        for key, better in (("margin", max), ("retention", max), ("kl", min)):
            mine = get(key, f"own:{u}", u)
            theirs = [get(key, o, u) for o in others]
            r.update({key: mine, f"{key}_others_mean": statistics.fmean(theirs) if theirs else None,
                      f"{key}_others_best": better(theirs) if theirs else None,
                      **{f"{key}_{g}": get(key, g, u) for g in kinds}})
            r[f"{key}_own_best"] = (better(theirs + [mine]) == mine and mine not in theirs) if theirs else None
        rows[u] = r
    seeds = {}
    for u in ps:
        vals = [get("margin", f"own:{u}", u)] + [get("margin", f"own:{u}@s{k}", u) for k in range(1, 5)]
        vals = [v for v in vals if v is not None]
        if len(vals) > 1:
            seeds[u] = {"margins": vals, "sd": statistics.stdev(vals)}
    seed_sd = statistics.fmean([x["sd"] for x in seeds.values()]) if seeds else None

    def agg(key, fn=statistics.fmean):
        xs = [r[key] for r in rows.values() if r.get(key) is not None]
        return fn(xs) if xs else None

    s = {"personas": done, "sparsity": run.a.sparsity, "profile": run.a.profile, "questions": run.a.questions,
         "tokens": run.a.tokens, "references": len(run.refs), "rows": rows, "seed_noise": seeds, "seed_sd": seed_sd,
         "compared": sum(1 for r in rows.values() if r["margin_own_best"] is not None),
         "own_best": sum(1 for r in rows.values() if r["margin_own_best"]),
         "own_kl_best": sum(1 for r in rows.values() if r["kl_own_best"]),
         "dense_margin": statistics.fmean([statistics.fmean(run.cells[(f"own:{u}", u)]["dense_margins"]) for u in done])
         if done else None}
    for key in ("margin", "margin_others_mean", "margin_others_best", "kl", "kl_others_mean", "kl_others_best",
                *(f"{k}_{g}" for k in ("margin", "kl") for g in kinds)):
        s[f"mean_{key}"] = agg(key)
    for key in ("retention", "retention_others_mean", *(f"retention_{g}" for g in kinds)):
        s[f"median_{key}"] = agg(key, statistics.median)
    for g in kinds:
        d = [r["margin"] - r[f"margin_{g}"] for r in rows.values() if r.get(f"margin_{g}") is not None]
        if d:
            s[f"own_minus_{g}"], s[f"own_above_{g}"], s[f"own_minus_{g}_n"] = statistics.fmean(d), sum(x > 0 for x in d), len(d)
    # overlap of the own masks against how alike the persona descriptions are
    kept = {u: run.stored(f"own:{u}")[1]["kept"] for u in done}
    pairs = [(u, v) for i, u in enumerate(done) for v in done[i + 1:]]
    if len(pairs) > 2:
        from pruning.eval.attribution import embed
        emb = embed([run.sets[u].persona or run.sets[u].system for u in done])
        pos = {u: i for i, u in enumerate(done)}
        jac = [jaccard(kept[u], kept[v]) for u, v in pairs]
        sim = [float(emb[pos[u]] @ emb[pos[v]]) for u, v in pairs]
        s["overlap"] = {"pairs": len(pairs), "jaccard_mean": statistics.fmean(jac), "jaccard_min": min(jac),
                        "jaccard_max": max(jac), "similarity_mean": statistics.fmean(sim), "r": pearson(jac, sim)}
        if (g := run.stored("global")[1]) is not None:
            s["overlap"]["jaccard_own_global"] = statistics.fmean([jaccard(kept[u], g["kept"]) for u in done])
        # random top-k sets of the same size: the floor a Jaccard is read against
        C, k = run.model.config.intermediate_size, run.k
        s["overlap"]["jaccard_random"] = k / (2 * C - k)
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None)
    ap.add_argument("--eval-dir", default=str(EVAL))
    ap.add_argument("--personas", default="all", help="comma-separated persona numbers of the eval dir, or all (0-9)")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--questions", type=int, default=10, help="specific questions per persona in each cell")
    ap.add_argument("--tokens", type=int, default=48, help="tokens of each greedy answer")
    ap.add_argument("--references", type=int, default=8, help="shipped reference personas the judge compares against")
    ap.add_argument("--seeds", default="1,2", help="extra learning seeds for the seed noise")
    ap.add_argument("--seed-personas", default="0,1,2")
    ap.add_argument("--no-global-all", action="store_true", help="skip the mask on every persona's whole set")
    ap.add_argument("--budget-s", type=float, default=0, help="start no new mask after this many seconds")
    ap.add_argument("--work", default=str(ROOT / ".bench" / "specificity"))
    ap.add_argument("--cache", default=str(ROOT / ".bench" / "quality" / "cache"),
                    help="synthetic sets (shared with benchmarks.quality)")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--core", default=None, help="also a row for this core directory's mask (at --sparsity)")
    ap.add_argument("--only-core", action="store_true", help="learn no new mask: add the core's row to what is cached")
    import sys
    a = ap.parse_args()
    a.cmdline = " ".join(sys.argv[1:])
    a.base = a.base or str(default_base())
    t0 = time.time()
    run = Run(a)

    def budget_left() -> bool:
        return not a.budget_s or time.time() - t0 < a.budget_s

    if a.core:
        run.row("core", lambda: run.core_mask(a.core))
    if not a.report_only and not a.only_core:
        # every persona's synthetic set first: the global masks need them all
        for u in run.personas:
            if budget_left() and run.stored(f"own:{u}")[1] is None:
                with persona_examples(run.model, run.tok, run.ctx(u)):
                    pass
        n_own = run.own_set_size()
        if budget_left():
            run.row("global", lambda: run.learn_global(max(1, round(n_own / len(run.personas)))))
        for u in run.personas:
            if budget_left():
                run.row(f"own:{u}", lambda u=u: run.learn_method(u))
        seed_ps = [int(x) for x in a.seed_personas.split(",") if x]
        for s in [int(x) for x in a.seeds.split(",") if x]:
            for u in seed_ps:
                if budget_left():
                    run.row(f"own:{u}@s{s}", lambda u=u, s=s: run.learn_seed(u, s), personas=[u])
        if budget_left():
            run.row("neutral", lambda: run.learn_method(None))
        if budget_left() and not a.no_global_all:
            run.row("global-all", lambda: run.learn_global(None))
    s = summarize(run)
    s["seconds"] = round(time.time() - t0)
    write_report(run, s, Path(a.out), time.time() - t0)
    print(json.dumps({k: v for k, v in s.items() if k not in ("rows", "seed_noise")}, indent=1))


if __name__ == "__main__":
    main()
