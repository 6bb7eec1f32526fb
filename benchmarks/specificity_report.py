"""The report of `benchmarks.specificity`: docs/specificity.md, its json and two heatmaps."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

KINDS = ("global", "global-all", "neutral", "core")  # the masks every persona is compared with


def _columns(run, ps) -> list[str]:
    return [f"own:{v}" for v in ps] + [g for g in KINDS if any((g, u) in run.cells for u in ps)]


def _value(cell: dict | None, key: str):
    if cell is None:
        return None
    return statistics.fmean(cell["margins"]) if key == "margin" else cell[key]


def heatmap(run, key: str, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = [u for u in run.personas if (f"own:{u}", u) in run.cells]
    if not ps:
        return
    cols = _columns(run, ps)
    nan = float("nan")
    data = [[(_value(run.cells.get((c, u)), key) if (c, u) in run.cells else nan) for c in cols] for u in ps]
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(cols), 1.2 + 0.5 * len(ps)))
    im = ax.imshow(data, cmap="viridis" if key != "kl" else "viridis_r")
    ax.set_xticks(range(len(cols)), [c.replace("own:", "mask ") for c in cols], rotation=60, ha="right")
    ax.set_yticks(range(len(ps)), [f"persona {u}" for u in ps])
    for i, r in enumerate(data):
        for j, x in enumerate(r):
            if x == x:
                ax.text(j, i, f"{x:.2f}" if key != "margin" else f"{1000 * x:.0f}", ha="center", va="center",
                        fontsize=6, color="w")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x, d=3):
    return "-" if x is None else f"{x:.{d}f}"


def _m(x):
    """A margin in milli-nats per token."""
    return "-" if x is None else f"{1000 * x:.1f}"


def write_report(run, s: dict, out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "specificity.json").write_text(json.dumps({"summary": s, "cells": list(run.cells.values())}, indent=1))
    heatmap(run, "margin", out / "specificity_margin.png", "judge margin, mnats/token (row: persona, column: mask)")
    heatmap(run, "kl", out / "specificity_kl.png", "persona KL to dense (row: persona, column: mask)")
    a = run.a
    L = ["# Is each persona's sub-network its own? (`benchmarks/specificity.py`)", "",
         f"Generated {time.strftime('%Y-%m-%d')} by `python -m benchmarks.specificity {a.cmdline}` "
         f"({seconds:.0f} s this run; masks and cells are cached, so a rerun adds only what is missing). "
         f"Base `{Path(a.base).name}`, sparsity {a.sparsity}, profile `{a.profile}`. A cell is one mask answering "
         f"one persona's first {a.questions} specific questions under that persona's system prompt ({a.tokens}-token "
         f"greedy answers). **Judge margin**: how much better the persona's own prompt explains those answers than "
         f"{s['references']} shipped reference personas' prompts do, under the dense base (mean NLL difference, "
         "milli-nats per token; loops count 0); **retention** = margin / the dense base's margin on the same "
         "questions; **KL**: persona KL to the dense base on its answers to the same questions.", "",
         "Masks: `own:v` persona v's persona-pruner mask; `global` one mask learned on all personas' synthetic "
         "sets combined, as many examples in all as one persona's set; `global-all` every example of every set; "
         "`neutral` the method run for a plain assistant prompt; `core` the base's shared core (`npc models core`: one "
         "mask learned on the shipped reference personas, none of them these), no scales. Channel scales included, "
         "as export folds them.", "",
         "## Verdict", ""]
    n, sd = s["compared"], s["seed_sd"]
    L.append(f"- Personas with their own mask and a full row: {len(s['personas'])} ({n} compared with the "
             "other personas' masks).")
    L.append(f"- Own mask best in its row by judge margin (= by retention): **{s['own_best']}/{n}**; "
             f"by persona KL: **{s['own_kl_best']}/{n}**.")
    L.append(f"- Mean judge margin (mnats/token): dense {_m(s['dense_margin'])}, own mask {_m(s['mean_margin'])}, "
             f"other personas' masks {_m(s['mean_margin_others_mean'])} (the best other per row "
             f"{_m(s['mean_margin_others_best'])}), global {_m(s.get('mean_margin_global'))}, global-all "
             f"{_m(s.get('mean_margin_global-all'))}, neutral {_m(s.get('mean_margin_neutral'))}, "
             f"core {_m(s.get('mean_margin_core'))}.")
    L.append(f"- Median retention: own {_f(s['median_retention'])}, other personas' masks "
             f"{_f(s['median_retention_others_mean'])}, global {_f(s.get('median_retention_global'))}, "
             f"global-all {_f(s.get('median_retention_global-all'))}, neutral {_f(s.get('median_retention_neutral'))}, "
             f"core {_f(s.get('median_retention_core'))} "
             "(a median: where the dense margin is near 0 a ratio explodes).")
    L.append(f"- Mean persona KL: own {_f(s['mean_kl'])}, the best other persona's mask {_f(s['mean_kl_others_best'])}, "
             f"global {_f(s.get('mean_kl_global'))}, global-all {_f(s.get('mean_kl_global-all'))}, "
             f"neutral {_f(s.get('mean_kl_neutral'))}, core {_f(s.get('mean_kl_core'))}.")
    for g in KINDS:
        if f"own_minus_{g}" in s:
            d = s[f"own_minus_{g}"]
            verdict = "" if sd is None else (f": more than twice the seed noise (2 x {_m(sd)})" if d > 2 * sd
                                             else f": **not** more than twice the seed noise (2 x {_m(sd)})")
            L.append(f"- Own minus {g}: {d * 1000:+.1f} mnats/token, own above {g} for "
                     f"{s[f'own_above_{g}']}/{s[f'own_minus_{g}_n']} personas{verdict}.")
    if sd is not None:
        L.append(f"- Seed noise: standard deviation of a persona's own margin over learning seeds (same data), "
                 f"mean over {len(s['seed_noise'])} personas: {_m(sd)} mnats/token ("
                 + "; ".join(f"persona {u}: {', '.join(_m(x) for x in v['margins'])}" for u, v in s["seed_noise"].items())
                 + ").")
    else:
        L.append("- Seed noise: not measured in this run.")
    if "overlap" in s:
        o = s["overlap"]
        L.append(f"- Mask overlap: mean Jaccard of two personas' kept channels {o['jaccard_mean']:.3f} "
                 f"({o['jaccard_min']:.3f}-{o['jaccard_max']:.3f}; random sets of this size: {o['jaccard_random']:.3f}"
                 + (f"; own vs global {o['jaccard_own_global']:.3f}" if "jaccard_own_global" in o else "")
                 + f"); Pearson r against the personas' MiniLM similarity over {o['pairs']} pairs: {o['r']:.2f}.")
    ps = s["personas"]
    cols = _columns(run, ps)
    for key, title, fmt in (("margin", "Judge margin, mnats/token (higher is better)", _m),
                            ("retention", "Retention", _f), ("kl", "Persona KL to dense (lower is better)", _f)):
        L += ["", f"## {title} (row: persona answering with its prompt; column: mask)", ""]
        L.append("| persona | " + " | ".join(c.replace("own:", "mask ") for c in cols) + " |")
        L.append("|---" * (len(cols) + 1) + "|")
        for u in ps:
            vals = [fmt(_value(run.cells.get((c, u)), key)) for c in cols]
            vals = [f"**{v}**" if c == f"own:{u}" else v for c, v in zip(cols, vals)]
            L.append(f"| {u} | " + " | ".join(vals) + " |")
    L += ["", "![judge margin](specificity_margin.png)", "", "![persona KL](specificity_kl.png)", "",
          "Every cell, with its per-question margins and 95 % interval of retention: `specificity.json`."]
    (out / "specificity.md").write_text("\n".join(L) + "\n")
