"""Measures that see the persona, with the dense base as the judge.

KL to the dense model moves with general damage (it barely depends on the persona); these ask
whether a model's text is *this* persona's rather than any persona's:

judge_margin   the model's own greedy answers `a` to the persona's questions (asked under its
               system prompt sys_u), scored by the dense base: the mean over answers of
               mean_v NLL(a | sys_v) - NLL(a | sys_u), per token, v over reference personas put in
               the same system-prompt template. How much better this persona's prompt explains the
               text than other personas' prompts do.
judge_top1     the share of answers for which sys_u gives the lowest NLL of all prompts.
retention      judge_margin(model) / judge_margin(dense base), on the same questions.
pmi_retention  teacher-forced on the dense answers A_u: PMI under the model / PMI under the dense
               base, PMI = mean_v NLL(A_u | sys_v) - NLL(A_u | sys_u).
degenerate     the share of own answers that loop (distinct-bigram ratio under 0.5, or empty) or
               recite the system prompt (half or more of their word trigrams are the prompt's): they
               count as margin 0 and never as top-1, since a loop of the persona's own words, or its
               description copied out, is very likely under its prompt without answering anything.
               Retention also caps each answer's margin at the dense base's best on the same
               questions, so a few extreme answers cannot outweigh the rest.
fluency_nll    the dense base's NLL of the model's own answers under sys_u: gibberish cannot hide.

Every mean comes with a bootstrap 95 % interval over questions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from pruning.chat import answer_ids, pad_id_of, prompt_ids
from pruning.prefix_forward import (Example, channel_mask, forward_suffixes, length_batches, logp_at, prefix_kv,
                                    scored_positions, shared_prompt_len)

LOOP_RATIO = 0.5
RECITAL_SHARE = 0.5


def _mean(xs: list[float]) -> float:
    """The mean of the values that are not NaN."""
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")
TEMPLATE = "You are roleplaying as a character with this persona: {persona}\nStay in character in every reply."


def _trigrams(text: str) -> list[tuple[str, ...]]:
    w = re.findall(r"\w+", text.lower())
    return [tuple(w[i: i + 3]) for i in range(len(w) - 2)]


def recital_share(answer: str, prompt: str) -> float:
    """The share of the answer's word trigrams that occur in `prompt` (0 under three words)."""
    tri = _trigrams(answer)
    if not tri:
        return 0.0
    have = set(_trigrams(prompt))
    return sum(t in have for t in tri) / len(tri)


def distinct_bigram_ratio(ids: list[int]) -> float:
    """Distinct token bigrams / bigrams; 0 for an empty answer, 1 for a one-token answer."""
    if not ids:
        return 0.0
    if len(ids) < 2:
        return 1.0
    pairs = list(zip(ids, ids[1:]))
    return len(set(pairs)) / len(pairs)


def persona_prompts(system: str | None, persona: str | None, references: list[str]) -> tuple[str, list[str]]:
    """(sys_u, [sys_v]): the target's prompt and each reference persona in the same template.

    When the target's system prompt contains its persona description, each reference takes the
    description's place in it (the eval files' own template); otherwise every persona, the target
    included, is put in TEMPLATE. References equal to the target persona are left out."""
    persona = (persona or "").strip()
    refs = [r for r in references if r.strip() and r.strip() != persona]
    if system and persona and persona in system:
        return system, [system.replace(persona, r.strip()) for r in refs]
    target = persona or (system or "")
    return TEMPLATE.format(persona=target), [TEMPLATE.format(persona=r.strip()) for r in refs]


@torch.no_grad()
def answer_nlls(model, tok, system: str | None, questions: list[str], answers: list[list[int]], *,
                masks=None, batch_size: int = 8) -> list[float]:
    """Mean per-token NLL of each answer (token ids) after its question under `system`; NaN for an
    empty answer. `masks`: 0/1 FFN channel masks applied to `model` (a pruned variant of it)."""
    keep = [i for i, a in enumerate(answers) if a]
    out = [float("nan")] * len(answers)
    if not keep:
        return out
    examples = []
    for i in keep:
        p = prompt_ids(tok, questions[i], system)
        examples.append(Example(p + answers[i], len(p)))
    P = shared_prompt_len(examples)
    pad = pad_id_of(tok)
    with channel_mask(model, masks):
        kv = prefix_kv(model, examples[0].ids[:P]) if P > 0 else None
        for idx in length_batches([len(e.ids) for e in examples], batch_size):
            hidden = forward_suffixes(model, kv, P, [examples[j].ids[P:] for j in idx], pad)
            rows, cols, tgt = scored_positions(examples, idx, P)
            lp = logp_at(model, hidden, rows, cols)
            nll = -lp.gather(1, tgt.to(lp.device)[:, None]).squeeze(1).double().cpu()
            n = [len(examples[j].ids) - examples[j].n_prompt for j in idx]
            for j, part in zip(idx, torch.split(nll, n)):
                out[keep[j]] = float(part.mean())
    return out


def bootstrap_ci(values: list[float], *, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile interval of the mean, resampling the values (questions) with replacement."""
    if not values:
        return [float("nan"), float("nan")]
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return [means[int(0.025 * n)], means[int(0.975 * n) - 1]]


def ratio_ci(num: list[float], den: list[float], *, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of mean(num) / mean(den), the same questions resampled for both."""
    rng = random.Random(seed)
    k = len(num)
    out = []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        d = sum(den[i] for i in idx)
        if d:
            out.append(sum(num[i] for i in idx) / d)
    out.sort()
    if not out:
        return [float("nan"), float("nan")]
    return [out[int(0.025 * len(out))], out[int(0.975 * len(out)) - 1]]


@dataclass
class JudgedAnswers:
    """One model's own answers to the persona's questions, as the dense judge sees them."""
    margins: list[float]       # per question, 0 for a degenerate answer
    top1: list[float]          # per question, 1.0 when sys_u gives the lowest NLL
    degenerate: list[float]    # per question, 1.0 for a loop, a recital or an empty answer
    fluency: list[float]       # per question, the judge's NLL under sys_u (NaN for an empty answer)
    recital: list[float]       # per question, 1.0 for an answer reciting the system prompt
    ref_nlls: list[list[float]]  # per reference, the judge's NLL of each answer

    def summary(self, seed: int = 0) -> dict:
        mean = _mean
        fl = [x for x in self.fluency if x == x]
        return {"judge_margin": round(mean(self.margins), 5),
                "judge_margin_ci": [round(x, 5) for x in bootstrap_ci(self.margins, seed=seed)],
                "judge_top1": round(mean(self.top1), 4),
                "judge_top1_ci": [round(x, 4) for x in bootstrap_ci(self.top1, seed=seed)],
                "degenerate": round(mean(self.degenerate), 4),
                "recital": round(mean(self.recital), 4),
                "fluency_nll": round(mean(fl), 4),
                "fluency_nll_ci": [round(x, 4) for x in bootstrap_ci(fl, seed=seed)]}


def _prompt_nlls(model, tok, sys_u: str, sys_refs: list[str], questions: list[str], answers: list[str],
                 finished: list[bool] | None, masks=None, batch_size: int = 8):
    """(answer ids, NLL per answer under sys_u, [NLL per answer under each sys_v]) under `model`."""
    ids = [answer_ids(tok, a, True if finished is None else finished[i]) for i, a in enumerate(answers)]
    own = answer_nlls(model, tok, sys_u, questions, ids, masks=masks, batch_size=batch_size)
    refs = [answer_nlls(model, tok, s, questions, ids, masks=masks, batch_size=batch_size) for s in sys_refs]
    return ids, own, refs


def _pmi(own: list[float], refs: list[list[float]]) -> list[float]:
    """Per answer: mean_v NLL(. | sys_v) - NLL(. | sys_u); 0 for an empty answer."""
    return [sum(r[i] for r in refs) / len(refs) - own[i] if refs and own[i] == own[i] else 0.0
            for i in range(len(own))]


def judged(ids, own, refs, finished: list[bool] | None, texts: list[str], prompt: str) -> JudgedAnswers:
    """The judge's measures of answers (token `ids`, `texts`) from their NLLs under the persona's
    prompt (`own`) and under each reference's (`refs`); `prompt` is the persona's system prompt."""
    margins, top1, degenerate, recital = [], [], [], []
    pmi = _pmi(own, refs)
    for i, a in enumerate(ids):
        # the answer's own ids without the end-of-turn token: a loop is in the words
        loop = distinct_bigram_ratio(a[:-1] if a and (finished is None or finished[i]) else a) < LOOP_RATIO
        recital.append(1.0 if recital_share(texts[i], prompt) >= RECITAL_SHARE else 0.0)
        if loop or recital[-1] or own[i] != own[i]:
            margins.append(0.0)
            top1.append(0.0)
            degenerate.append(1.0)
            continue
        margins.append(pmi[i])
        top1.append(1.0 if all(own[i] < r[i] for r in refs) else 0.0)
        degenerate.append(0.0)
    return JudgedAnswers(margins, top1, degenerate, own, recital, refs)


def judge_answers(judge, tok, sys_u: str, sys_refs: list[str], questions: list[str], answers: list[str],
                  finished: list[bool] | None = None, batch_size: int = 8) -> JudgedAnswers:
    """The dense judge's margin, top-1 and fluency of one model's own answers."""
    ids, own, refs = _prompt_nlls(judge, tok, sys_u, sys_refs, questions, answers, finished, batch_size=batch_size)
    return judged(ids, own, refs, finished, answers, sys_u)


def pmi_per_question(model, tok, sys_u: str, sys_refs: list[str], questions: list[str], answers: list[str],
                     finished: list[bool] | None = None, *, masks=None, batch_size: int = 8) -> list[float]:
    """Per question: mean_v NLL(A_u | sys_v) - NLL(A_u | sys_u) under `model` (with `masks`),
    teacher-forced on the given answers (the dense base's)."""
    _, own, refs = _prompt_nlls(model, tok, sys_u, sys_refs, questions, answers, finished, masks, batch_size)
    return _pmi(own, refs)


def retention(model_margins: list[float], dense_margins: list[float], seed: int = 0) -> dict:
    """sum(model margins) / sum(dense margins), each model margin capped at the dense base's best."""
    cap = max(dense_margins) if dense_margins else float("inf")
    capped = [min(m, cap) for m in model_margins]
    den = sum(dense_margins)
    value = sum(capped) / den if den else float("nan")
    return {"retention": round(value, 4),
            "retention_ci": [round(x, 4) for x in ratio_ci(capped, dense_margins, seed=seed)]}


@dataclass
class DenseReference:
    """The dense base's side of every measure for one persona's questions: computed once, shared
    by every model compared with it."""
    answers: list[tuple[str, bool]]
    judged: JudgedAnswers
    pmi: list[float]


def dense_reference(dense, tok, sys_u: str, sys_refs: list[str], questions: list[str],
                    dense_answers: list[tuple[str, bool]], batch_size: int = 8) -> DenseReference:
    da, df = [a for a, _ in dense_answers], [f for _, f in dense_answers]
    # the judge of the dense answers and their PMI under the dense base read the same NLLs
    ids, own, refs = _prompt_nlls(dense, tok, sys_u, sys_refs, questions, da, df, batch_size=batch_size)
    return DenseReference(dense_answers, judged(ids, own, refs, df, da, sys_u), _pmi(own, refs))


def fidelity_summary(own: JudgedAnswers, dense: JudgedAnswers, pmi: list[float], pmi_dense: list[float],
                     seed: int = 0) -> dict:
    """Every persona measure of one model from its judged answers and PMI against the dense base's."""
    den = sum(pmi_dense)
    return {**own.summary(seed), **retention(own.margins, dense.margins, seed),
            "pmi": round(_mean(pmi), 5), "pmi_retention": round(sum(pmi) / den, 4) if den else float("nan"),
            "pmi_retention_ci": [round(x, 4) for x in ratio_ci(pmi, pmi_dense, seed=seed)],
            "references": len(own.ref_nlls), "questions": len(own.margins),
            "dense": {**dense.summary(seed), "pmi": round(_mean(pmi_dense), 5)}}


def persona_fidelity(dense, tok, sys_u: str, sys_refs: list[str], questions: list[str],
                     dense_answers: list[tuple[str, bool]], own_answers: list[tuple[str, bool]], *,
                     model=None, masks=None, seed: int = 0, batch_size: int = 8,
                     reference: DenseReference | None = None, detail: bool = False) -> dict:
    """Every persona measure of one model (`model`, or the dense base under `masks`) against the
    dense base on the same questions; `*_answers` are (text, finished) greedy answers under sys_u
    (`reference`: the dense side, when it was computed already). `detail`: also the answers and
    the judge's NLLs of each (under "detail"), from which `rejudge` recomputes every measure."""
    ref = reference or dense_reference(dense, tok, sys_u, sys_refs, questions, dense_answers, batch_size)
    oa, of = [a for a, _ in own_answers], [f for _, f in own_answers]
    if model is None and masks is None and list(own_answers) == list(ref.answers):
        own, pmi = ref.judged, ref.pmi  # the dense base itself: its side is computed already
    else:
        da, df = [a for a, _ in ref.answers], [f for _, f in ref.answers]
        own = judge_answers(dense, tok, sys_u, sys_refs, questions, oa, of, batch_size)
        pmi = pmi_per_question(model if model is not None else dense, tok, sys_u, sys_refs, questions, da, df,
                               masks=None if model is not None else masks, batch_size=batch_size)
    out = fidelity_summary(own, ref.judged, pmi, ref.pmi, seed)
    if detail:
        out["detail"] = answer_detail(own_answers, own, pmi)
    return out


def answer_detail(answers: list[tuple[str, bool]], j: JudgedAnswers, pmi: list[float]) -> dict:
    """What `rejudge` needs of one model's judged answers: the answers, the judge's NLLs of each
    under the persona's prompt and the references', and the PMI per question."""
    return {"answers": [list(x) for x in answers], "own": j.fluency, "refs": j.ref_nlls, "pmi": pmi}


def judged_detail(tok, detail: dict, prompt: str) -> JudgedAnswers:
    """`judged` of a stored `answer_detail`, under the persona's system prompt `prompt`."""
    texts, fin = [a for a, _ in detail["answers"]], [f for _, f in detail["answers"]]
    ids = [answer_ids(tok, t, f) for t, f in zip(texts, fin)]
    return judged(ids, detail["own"], detail["refs"], fin, texts, prompt)


def rejudge(tok, prompt: str, model: dict, dense: dict, seed: int = 0) -> dict:
    """`fidelity_summary` from stored `answer_detail`s of a model and of the dense base: the
    measure's rules (guards, cap) applied again without a model."""
    return fidelity_summary(judged_detail(tok, model, prompt), judged_detail(tok, dense, prompt),
                            model["pmi"], dense["pmi"], seed)
