"""Does a card's lore and example dialogue in the pruning data keep more of the persona?

    .venv/bin/python -m benchmarks.card_data --card ../shared/data/cards/seraphina.st_default.v2.json
        # -> docs/card_data.md (+ .json)

One card, two persona-pruner NPCs at the same sparsity, profile and seed:
- `persona`: the data written under the NPC's own system prompt (its persona and the card's system
  prompt), as every NPC was pruned before;
- `card`: what the service now does for a card (`service.npcs.prompt.pruning_inputs`): the data
  written under the system prompt its chats get when its lore comes up (the keyed lore and the example
  dialogue), with questions on the lorebook's topics always in it.
Both are scored against the dense base with the fidelity measures (`pruning.eval.persona`: judge
margin retention with a bootstrap interval), under that chat-time system prompt, on two
question sets neither was tuned on: `lore` (the lorebook's keys in other phrasings than the pruning
questions) and `general` (an eval file's questions, `--general`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import ROOT, default_base

EVAL_FORMS = ("I heard a story about {key}. Is it true?", "Why do people in these parts talk about {key}?",
              "If I went looking for {key}, what would I find?")


def lore_eval_questions(card: dict) -> list[str]:
    from service.npcs import lore

    book = lore.book_of(card)
    keys = [k for e in (book.entries if book else ()) for k in e.keys[:1] if not e.regex and not k.startswith("/")]
    return [f.format(key=k) for k in dict.fromkeys(keys) for f in EVAL_FORMS]


def run(args) -> dict:
    import torch

    from pruning.datasets import load_reference_personas
    from pruning.eval.persona import persona_fidelity, persona_prompts
    from pruning.eval.run import Generator
    from pruning.model_io import load_model
    from pruning.prune import prune
    from service.npcs.cards import card_to_npc, parse_card
    from service.npcs.persona import system_prompt_of
    from service.npcs.prompt import pruning_inputs

    card = parse_card(Path(args.card).read_bytes())
    rec = card_to_npc(card, 8000)
    chat_system, lore_questions = pruning_inputs(rec, card)
    if not lore_questions:
        raise SystemExit(f"{args.card} has no lorebook entries with plain keys: nothing to compare")
    general = json.loads(Path(args.general).read_text())["questions"][: args.questions]
    sets = {"lore": lore_eval_questions(card), "general": general}
    base = Path(args.base) if args.base else default_base()
    refs = load_reference_personas(None)[: args.references]
    sys_u, sys_refs = persona_prompts(chat_system, rec["persona"], refs)
    variants = {"persona": (system_prompt_of(rec), {}),
                "card": (chat_system, {"extra_instructions": lore_questions})}
    dense, tok = load_model(base, dtype=torch.float32)
    gen = Generator("hf", base, dense, tok)
    dense_answers = {k: gen.answers(sys_u, qs, args.max_new_tokens) for k, qs in sets.items()}
    out: dict = {"card": Path(args.card).name, "sparsity": args.sparsity, "profile": args.profile, "seed": args.seed,
                 "lore_pruning_questions": lore_questions, "sets": sets, "system_chars": len(chat_system),
                 "models": {}}
    with tempfile.TemporaryDirectory(prefix="npc-card-data-") as tmp:
        for name, (system, extra) in variants.items():
            d = Path(tmp) / name
            summary = prune(base, rec["persona"], args.sparsity, "persona-pruner", d, seed=args.seed,
                            system_prompt=system, options={"profile": args.profile, **extra},
                            cache_dir=Path(tmp) / "cache")
            model, _ = load_model(d, dtype=torch.float32)
            g = Generator("hf", d, model, tok)
            out["models"][name] = {"seconds": summary["seconds"], "sets": {}}
            for k, qs in sets.items():
                own = g.answers(sys_u, qs, args.max_new_tokens)
                out["models"][name]["sets"][k] = persona_fidelity(dense, tok, sys_u, sys_refs, qs, dense_answers[k], own,
                                                                  model=model, seed=args.seed)
                print(name, k, json.dumps({m: out["models"][name]["sets"][k][m]
                                            for m in ("retention", "retention_ci", "judge_margin", "degenerate")}),
                      flush=True)
    return out


def report(res: dict) -> str:
    rows = []
    for name, m in res["models"].items():
        for k, r in m["sets"].items():
            ci = r.get("retention_ci") or [float("nan")] * 2
            rows.append(f"| {name} | {k} ({r['questions']}) | {r['retention']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                        f"| {r['judge_margin']:.4f} (dense {r['dense']['judge_margin']:.4f}) | {r['judge_top1']:.2f} "
                        f"| {r['degenerate']:.2f} | {r['pmi_retention']:.3f} |")
    return "\n".join([
        "# A card's lore and example dialogue in the pruning data",
        "",
        f"`python -m benchmarks.card_data --card {res['card']}` (sparsity {res['sparsity']}, profile "
        f"`{res['profile']}`, seed {res['seed']}). `persona`: data under the NPC's own system prompt; `card`: "
        "data under the chat-time system prompt with the keyed lore and the example dialogue "
        f"({res['system_chars']} characters), plus {len(res['lore_pruning_questions'])} lore questions. Scored "
        "under that chat-time prompt against the dense base; retention = judge margin / the dense base's, "
        "with a bootstrap 95 % interval over questions.",
        "",
        "| data | questions | retention [95 % CI] | judge margin, nats/token | top-1 | degenerate | PMI retention |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--card", required=True)
    ap.add_argument("--general", default=str(ROOT.parent / "shared/data/eval/persona_alpaca_general_user_0.json"),
                    help="an eval file whose questions are the general set")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--references", type=int, default=8)
    ap.add_argument("--base", default=None)
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-doc", dest="doc", action="store_false")
    args = ap.parse_args()
    res = run(args)
    print(report(res))
    if args.doc:
        (ROOT / "docs" / "card_data.json").write_text(json.dumps(res, indent=1) + "\n")
        (ROOT / "docs" / "card_data.md").write_text(report(res))


if __name__ == "__main__":
    main()
