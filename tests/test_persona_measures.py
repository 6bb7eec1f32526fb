"""The persona measures: they tell a persona's own text from another persona's, and loops cannot game them."""

from __future__ import annotations

import pytest

from pruning.eval.persona import (TEMPLATE, bootstrap_ci, distinct_bigram_ratio, judge_answers, persona_fidelity,
                                  persona_prompts, ratio_ci, recital_share, rejudge, retention)

PIRATE = "A grumpy old pirate captain who loves rum, hates the navy and talks about storms and treasure."
BAKER = "A cheerful village baker who adores sourdough and cinnamon buns and gives advice with baking metaphors."
ROBOT = "A precise maintenance robot on a space station who reports in numbered lists and loves checksums."
QUESTIONS = ["How was your day?", "What do you think about the sea?", "Give me one piece of advice."]


def test_distinct_bigram_ratio_finds_loops():
    assert distinct_bigram_ratio([1, 2, 3, 4, 5]) == 1.0
    assert distinct_bigram_ratio([7, 8] * 10) < 0.5
    assert distinct_bigram_ratio([]) == 0.0


def test_references_share_the_targets_template():
    system = f"You are roleplaying as a user with this persona: {PIRATE}\nAnswer the question."
    sys_u, refs = persona_prompts(system, PIRATE, [BAKER, PIRATE, ROBOT])
    assert sys_u == system
    assert refs == [system.replace(PIRATE, BAKER), system.replace(PIRATE, ROBOT)]  # the target itself left out
    sys_u, refs = persona_prompts("Be nice.", PIRATE, [BAKER])  # no description inside: one template for all
    assert sys_u == TEMPLATE.format(persona=PIRATE) and refs == [TEMPLATE.format(persona=BAKER)]


def test_recital_share_finds_a_copied_prompt():
    system = TEMPLATE.format(persona=PIRATE)
    assert recital_share("A grumpy old pirate captain who loves rum and hates the navy.", system) >= 0.5
    assert recital_share("Arr, the sea be cruel today, and me rum be running low!", system) == 0.0
    assert recital_share("Storms and treasure, lad: the navy will never catch me ship.", system) < 0.5
    assert recital_share("Aye.", system) == 0.0


def test_retention_caps_each_answer_at_the_dense_best():
    """One extreme answer cannot outweigh the rest: every margin counts at most the dense base's best."""
    assert retention([5.0, 0.0, 0.0], [0.2, 0.1, 0.1])["retention"] == pytest.approx(0.5)
    assert retention([0.2, 0.1, 0.1], [0.2, 0.1, 0.1])["retention"] == pytest.approx(1.0)
    assert retention([-1.0, 0.1, 0.1], [0.2, 0.1, 0.1])["retention"] == pytest.approx(-2.0)


def test_bootstrap_intervals_hold_the_mean():
    xs = [0.1, 0.4, 0.2, 0.9, 0.5]
    lo, hi = bootstrap_ci(xs)
    assert lo <= sum(xs) / len(xs) <= hi and lo < hi
    lo, hi = ratio_ci(xs, xs)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


@pytest.fixture(scope="module")
def dense(base_dir):
    import torch

    from pruning.model_io import load_model

    return load_model(base_dir, dtype=torch.float32)


def test_the_dense_judge_prefers_the_personas_own_text(dense):
    model, tok = dense
    sys_u, refs = persona_prompts(None, PIRATE, [BAKER, ROBOT])
    pirate = ["Arr, the sea be cruel today, matey, and me rum be running low!",
              "Storms and treasure, lad: the navy will never catch me ship.",
              "Never trust the navy, and always keep a barrel of rum below deck."]
    baker = ["My sourdough rose beautifully this morning, and the cinnamon buns are still warm!",
             "Life is like bread dough: give it time and warmth and it rises.",
             "Knead your worries like dough, then let them rest a while."]
    own = judge_answers(model, tok, sys_u, refs, QUESTIONS, pirate)
    other = judge_answers(model, tok, sys_u, refs, QUESTIONS, baker)
    assert sum(own.margins) > 0 > sum(other.margins)
    assert sum(own.top1) > sum(other.top1)
    loop = judge_answers(model, tok, sys_u, refs, QUESTIONS, ["rum rum rum rum rum rum rum rum rum rum"] * 3)
    assert loop.degenerate == [1.0, 1.0, 1.0] and loop.margins == [0.0] * 3 and loop.top1 == [0.0] * 3
    # the persona's description copied out explains itself best of all, and answers nothing
    recital = [PIRATE, "I am " + PIRATE, "He is " + PIRATE.lower()]
    raw = judge_answers(model, tok, sys_u, refs, QUESTIONS, recital)
    assert raw.recital == [1.0] * 3 and raw.degenerate == [1.0] * 3 and raw.margins == [0.0] * 3
    unguarded = [sum(r[i] for r in raw.ref_nlls) / len(raw.ref_nlls) - raw.fluency[i] for i in range(3)]
    assert sum(unguarded) > sum(own.margins)  # what it would score without the guard


def test_the_dense_model_retains_all_of_itself(dense):
    from pruning.generate.hf import generate_detailed

    model, tok = dense
    sys_u, refs = persona_prompts(None, PIRATE, [BAKER, ROBOT])
    answers = generate_detailed(model, tok, sys_u, QUESTIONS, 24)
    out = persona_fidelity(model, tok, sys_u, refs, QUESTIONS, answers, answers)
    assert out["retention"] == pytest.approx(1.0) and out["pmi_retention"] == pytest.approx(1.0)
    assert out["judge_margin"] == out["dense"]["judge_margin"]
    assert out["judge_margin_ci"][0] <= out["judge_margin"] <= out["judge_margin_ci"][1]


def test_stored_answers_are_judged_again_to_the_same_measures(dense):
    """`rejudge` recomputes every measure from a run's stored answers and NLLs, without a model."""
    from pruning.generate.hf import generate_detailed
    import torch

    from pruning.prefix_forward import channel_mask, kept_masks

    model, tok = dense
    sys_u, refs = persona_prompts(None, PIRATE, [BAKER, ROBOT])
    answers = generate_detailed(model, tok, sys_u, QUESTIONS, 24)
    half = torch.arange(0, model.config.intermediate_size, 2)  # every other channel: a damaged model
    masks = kept_masks(model, [half] * model.config.num_hidden_layers)
    with channel_mask(model, masks):
        own = generate_detailed(model, tok, sys_u, QUESTIONS, 24)
    d = persona_fidelity(model, tok, sys_u, refs, QUESTIONS, answers, answers, detail=True)
    out = persona_fidelity(model, tok, sys_u, refs, QUESTIONS, answers, own, masks=masks, detail=True)
    again = rejudge(tok, sys_u, out["detail"], d["detail"])
    for k in ("retention", "judge_top1", "judge_margin", "pmi_retention", "degenerate", "fluency_nll"):
        assert again[k] == pytest.approx(out[k], nan_ok=True), k


def test_generation_keeps_a_long_persona_prompt_whole(dense):
    """A persona prompt of ~700 tokens reaches the model whole (it used to lose its start past 512)."""
    from pruning.chat import prompt_ids
    from pruning.generate.hf import generate_detailed, generate_ids

    model, tok = dense
    system = "Your name is Captain Rook. " + " ".join(f"Fact {i}: the sea is wide and the rum is gone." for i in range(60))
    assert len(prompt_ids(tok, "What is your name?", system)) > 600
    got = generate_detailed(model, tok, system, ["What is your name?"], 8)
    assert got == generate_ids(model, tok, [prompt_ids(tok, "What is your name?", system)], 8)
