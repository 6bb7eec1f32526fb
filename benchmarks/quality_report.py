"""The report of `benchmarks.quality`: summary, checks, plots and the markdown table (also rebuilt
from a stored quality.csv with `--report-only`)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from benchmarks import ROOT
from pruning.datasets import load_reference_personas

GENERIC = ["random", "magnitude", "activation", "taylor", "depth"]
PERSONAL = ["activation-prompt", "activation-persona", "persona-pruner"]
BASELINES = GENERIC + ["activation-prompt", "activation-persona"]
FIDELITY = ["retention", "judge_top1", "pmi_retention", "degenerate", "recital", "fluency_nll"]


def report_only(a, rescored: dict | None = None) -> None:
    """The report from the rows written so far (a run that was stopped early), or after `--rescore`
    (`rescored`: its entry for the run log)."""
    out, work = Path(a.out), Path(a.work)
    rows = read_rows(out / "quality.csv")
    # a stopped run: the personas persona-pruner reached (every row when it was not run)
    done = {r["persona"] for r in rows if r["method"] == "persona-pruner"} or {r["persona"] for r in rows}
    rows = [r for r in rows if r["persona"] in done]
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    methods = [m for m in a.methods.split(",") if any(r["method"] == m for r in rows)]
    pt_path = next((p for p in (out / "prune_times.json", work / "prune_times.json") if p.is_file()), None)
    pt = [p for p in (json.loads(pt_path.read_text()) if pt_path else []) if p["persona"] in done]
    summary = summarize(rows, sparsities, methods, pt)
    runs = stored_runs(out) + ([rescored] if rescored else [])
    summary["runs"] = runs
    summary["total_s"] = runs[0]["seconds"] if len(runs) == 1 and not runs[0].get("merge") else None
    if rescored:
        (out / "quality.json").write_text(json.dumps({"summary": summary, "rows": rows, "prune_times": pt}, indent=1))
    plot(rows, sparsities, methods, out)
    write_md(summary, rows, sparsities, methods, out, a)
    print(json.dumps(summary, indent=1))


def stored_runs(out: Path) -> list[dict]:
    p = out / "quality.json"
    return json.loads(p.read_text())["summary"].get("runs", []) if p.is_file() else []


def read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            rows.append({k: (v if k == "method" else (None if v == "" else float(v))) for k, v in r.items()})
    for r in rows:
        r["persona"] = int(r["persona"])
    return rows


def append_row(path: Path, fields: list[str], row: dict) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerow({k: row.get(k) for k in fields})


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarize(rows, sparsities, methods, prune_times) -> dict:
    out: dict = {"by_method": {}, "checks": {}}
    for s in sparsities:
        for m in methods:
            r = [x for x in rows if x["method"] == m and x["sparsity"] == s]
            out["by_method"][f"{m}@{s}"] = {k: _mean([x.get(k) for x in r]) for k in
                                            ("persona_kl", "persona_nll", "general_kl", "general_nll", "attribution",
                                             *FIDELITY)}
            # a ratio over 20 answers: one persona with a near-zero dense margin can swing the mean
            ret = [x["retention"] for x in r if x.get("retention") is not None]
            out["by_method"][f"{m}@{s}"]["retention_median"] = statistics.median(ret) if ret else None
        if "persona-pruner" not in methods:
            continue
        base = [m for m in methods if m in BASELINES]
        pp = {x["persona"]: x for x in rows if x["method"] == "persona-pruner" and x["sparsity"] == s}
        wins = 0
        for u, row in pp.items():
            others = [x["persona_kl"] for x in rows if x["persona"] == u and x["sparsity"] == s and x["method"] in base]
            wins += all(row["persona_kl"] < o for o in others)
        bm = {m: out["by_method"][f"{m}@{s}"] for m in base}
        me = out["by_method"][f"persona-pruner@{s}"]
        if not bm:  # persona-pruner alone (a rerun after a change): nothing to compare with
            out["checks"][str(s)] = {"retention": me["retention"], "personas": len(pp)}
            continue
        best_p = min(bm, key=lambda m: bm[m]["persona_kl"])
        best_g = min(bm, key=lambda m: bm[m]["general_kl"])
        retention_wins, retention_compared, top1_wins, judged = 0, 0, 0, set()
        for u, row in pp.items():
            # baseline rows from before the judge measures have no retention: compared with the rest
            others = {x["method"]: x["retention"] for x in rows if x["persona"] == u and x["sparsity"] == s
                      and x["method"] in base and x.get("retention") is not None}
            if row.get("retention") is None or not others:
                continue
            judged |= set(others)
            retention_compared += 1
            retention_wins += all(row["retention"] > o for o in others.values())
            top1 = [x["judge_top1"] for x in rows if x["persona"] == u and x["sparsity"] == s
                    and x["method"] in others and x.get("judge_top1") is not None]
            top1_wins += row.get("judge_top1") is not None and all(row["judge_top1"] > o for o in top1)
        out["checks"][str(s)] = {
            "retention": me["retention"], "retention_median": me["retention_median"], "retention_wins": retention_wins,
            "retention_compared": retention_compared, "retention_baselines": sorted(judged), "top1_wins": top1_wins,
            "wins": wins, "personas": len(pp), "best_baseline_persona": best_p,
            "persona_kl_ratio_to_best": me["persona_kl"] / bm[best_p]["persona_kl"],
            "best_baseline_general": best_g,
            "general_kl_ratio_to_best": me["general_kl"] / bm[best_g]["general_kl"],
        }
    if prune_times:
        first = [p["seconds"] for p in prune_times if not p["cached_data"]]
        out["prune_seconds_with_data"] = {"mean": _mean(first), "max": max(first) if first else None}
        out["prune_seconds_cached_data"] = _mean([p["seconds"] for p in prune_times if p["cached_data"]])
    return out


def plot(rows, sparsities, methods, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, title, fname in (("persona_kl", "persona KL(dense || pruned), mean of personas", "quality_persona_kl.png"),
                              ("general_kl", "general KL(dense || pruned), mean of personas", "quality_general_kl.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for m in methods:
            ys = [_mean([x[key] for x in rows if x["method"] == m and x["sparsity"] == s]) for s in sparsities]
            ax.plot(sparsities, ys, marker="o", label=m, linewidth=2.5 if m == "persona-pruner" else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel("FFN sparsity")
        ax.set_ylabel("KL (nats/token, log scale)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def _shown(path: str) -> str:
    """A path as the report shows it: relative to the project (or to its parent, for shared/), with ~."""
    p = Path(path).expanduser().resolve()
    for root in (ROOT, ROOT.parent):
        if p.is_relative_to(root):
            return str(p.relative_to(root))
    return str(p).replace(str(Path.home()), "~", 1)


def write_md(summary, rows, sparsities, methods, out: Path, a) -> None:
    bm = summary["by_method"]
    lines = ["# Role-play fidelity by pruning method", "",
             f"Generated by `benchmarks/quality.py` (profile `{a.profile}`, {len(set(r['persona'] for r in rows))} "
             f"personas from `{_shown(a.eval_dir)}`, base `{_shown(a.base)}`, "
             + (f"every method pruning within the core `{_shown(a.core)}`, " if getattr(a, "core", None) else "")
             + f"dense answers by {a.backend}, "
             f"{a.max_new_tokens} tokens; " + (f"total {summary['total_s']} s" if isinstance(summary.get("total_s"), int)
                                                else "rows gathered from several runs, see below") + " on this 2-core box).", "",
             "Lower KL is better: mean per-token KL(dense || pruned) on the dense model's own greedy answers, "
             "teacher-forced; persona = the eval's specific questions with the persona system prompt, general = "
             "its general questions without one. " + (
                 f"Attribution: share of the pruned model's answers (first {a.attribution_n} questions, 48 "
                 "tokens) whose MiniLM embedding is nearest to the right persona among it and "
                 f"{len(load_reference_personas())} reference personas." if a.attribution_n else
                 "Attribution was not measured in this run (`--attribution-n 0`: generating with every "
                 "method did not fit the session); `npc eval` and every service NPC report it."), ""]
    runs = summary.get("runs") or []
    if len(runs) > 1:
        lines += [f"Coverage: {len(runs)} runs, each later one merged into the stored rows (`--merge`: it redoes "
                  "the named methods × personas × sparsities and keeps every other row); same dense answers and "
                  "evaluation code throughout."]
        for r in runs:
            if r.get("rescore"):
                lines.append(f"- {r['date']}: `--rescore`, {r['note']}")
                continue
            lines.append(f"- {r['date']}, {r['seconds']} s: `{r['methods']}` for personas {r['personas']} at "
                         f"sparsity {r['sparsities']}" + (f". {r['note']}" if r.get("note") else ""))
        lines.append("")
    dense_attr = _mean([r["attribution"] for r in rows if r["method"] == "dense"])
    if dense_attr is not None and dense_attr < 0.25:
        lines += [f"Attribution sits near its floor for every model here, the dense one included ({dense_attr:.2f}): "
                  "the eval's questions are Alpaca tasks whose answers read alike whoever the persona is, so at "
                  f"{a.attribution_n} answers per persona it does not separate the methods; KL is the measure to read.", ""]
    head = "| method | " + " | ".join(f"persona KL @{s} | general KL @{s}" for s in sparsities) + \
        " | persona NLL @" + str(sparsities[0]) + " | attribution @" + str(sparsities[0]) + " |"
    lines += [head, "|" + "---|" * (3 + 2 * len(sparsities))]
    dense = [r for r in rows if r["method"] == "dense"]
    lines.append("| dense | " + " | ".join("0 | 0" for _ in sparsities) +
                 f" | {_mean([r['persona_nll'] for r in dense]):.3f} | {_fmt(_mean([r['attribution'] for r in dense]))} |")
    for m in methods:
        cells = []
        for s in sparsities:
            cells += [_fmt(bm[f"{m}@{s}"]["persona_kl"]), _fmt(bm[f"{m}@{s}"]["general_kl"])]
        first = bm[f"{m}@{sparsities[0]}"]
        name = f"**{m}**" if m == "persona-pruner" else m
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(first['persona_nll'])} | {_fmt(first['attribution'])} |")
    if any(r.get("retention") is not None for r in rows):
        lines += ["", "## Persona fidelity (the dense base as judge: `pruning/eval/persona.py`)", "",
                  f"Each model's own greedy answers ({a.fidelity_tokens} tokens, first {a.fidelity_n} questions) under "
                  "the persona's prompt; judge margin = mean over the reference personas of NLL(answer | their prompt) "
                  "- NLL(answer | the persona's), per token, over " + (f"the first {a.fidelity_references} shipped"
                  if getattr(a, "fidelity_references", None) else "the shipped") + " reference personas; retention = margin / the dense base's on the same "
                  "questions, each answer's margin capped at the dense base's best; top-1 = share of answers the persona's "
                  "own prompt explains best; PMI retention = the margin teacher-forced on the dense answers, under the "
                  "model / under the dense base; degenerate = answers that loop or recite the system prompt (half their "
                  "word trigrams from it): margin 0, never top-1.", "",
                  "| method | " + " | ".join(f"retention @{s}, mean (median) | top-1 @{s} | PMI ret. @{s}"
                                            for s in sparsities) +
                  f" | degenerate @{sparsities[0]} |",
                  "|" + "---|" * (2 + 3 * len(sparsities))]
        dense_top1 = _mean([r.get("judge_top1") for r in dense])
        lines.append("| dense | " + " | ".join(f"1 | {_fmt(dense_top1, 2)} | 1" for _ in sparsities) +
                     f" | {_fmt(_mean([r.get('degenerate') for r in dense]), 2)} |")
        for m in methods:
            cells = []
            for s in sparsities:
                b = bm[f"{m}@{s}"]
                med = f" ({_fmt(b['retention_median'], 3)})" if b.get("retention_median") is not None else ""
                cells += [_fmt(b["retention"], 3) + med, _fmt(b["judge_top1"], 2), _fmt(b["pmi_retention"], 3)]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(bm[f'{m}@{sparsities[0]}']['degenerate'], 2)} |")
    lines += ["", "## Checks", ""]
    for s, c in summary["checks"].items():
        if "wins" not in c:
            lines.append(f"- sparsity {s}: persona-pruner alone (no baseline in this run): retention "
                         f"**{_fmt(c['retention'], 3)}** over {c['personas']} personas.")
            continue
        lines.append(f"- sparsity {s}: persona-pruner has the lowest persona KL for **{c['wins']}/{c['personas']}** "
                     f"personas; its mean persona KL is **{c['persona_kl_ratio_to_best']:.1%}** of the best baseline's "
                     f"({c['best_baseline_persona']}); its general KL is **{c['general_kl_ratio_to_best']:.2f}x** the "
                     f"best baseline's ({c['best_baseline_general']})." + (
                         f" Retention **{c['retention']:.3f}** (median {_fmt(c.get('retention_median'), 3)})" + (
                             f", above every baseline that has it ({', '.join(c['retention_baselines'])}) for "
                             f"**{c['retention_wins']}/{c['retention_compared']}** personas; judge top-1 above every one of "
                             f"them for **{c['top1_wins']}/{c['retention_compared']}**." if c.get("retention_compared") else
                             " (no baseline row has retention yet).") if c.get("retention") is not None else ""))
    if "prune_seconds_with_data" in summary:
        p, cached = summary["prune_seconds_with_data"], summary["prune_seconds_cached_data"]
        parts = ([f"one persona including its synthetic data: mean {p['mean']:.0f} s, max {p['max']:.0f} s"]
                 if p["mean"] is not None else [])
        parts += [f"with the synthetic data already cached: mean {cached:.0f} s"] if cached is not None else []
        lines.append(f"- `{a.profile}` profile persona-pruner prune time, " + "; ".join(parts) + ".")
    lines += ["", "## Per persona (persona KL)", "",
              "| persona | " + " | ".join(f"{m} @{s}" for s in sparsities for m in methods) + " |",
              "|---|" + "---|" * (len(sparsities) * len(methods))]
    for u in sorted({r["persona"] for r in rows}):
        cells = []
        for s in sparsities:
            for m in methods:
                r = [x for x in rows if x["persona"] == u and x["method"] == m and x["sparsity"] == s]
                cells.append(_fmt(r[0]["persona_kl"]) if r else "")
        lines.append(f"| {u} | " + " | ".join(cells) + " |")
    lines += ["", "![persona KL](quality_persona_kl.png)", "", "![general KL](quality_general_kl.png)", "",
              "Raw rows: `quality.csv`; everything: `quality.json`. Experiments behind the method's settings "
              "(a mask oracle, data selection and size, what Alpaca-style questions and longer answers could give, "
              "the `thorough` profile): `quality_experiments.md`."]
    (out / "quality.md").write_text("\n".join(lines) + "\n")


def _fmt(x, nd=4) -> str:
    return "" if x is None else f"{x:.{nd}f}"
