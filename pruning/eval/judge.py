"""The paper's LLM-judge protocol against any OpenAI-compatible chat endpoint.

The judge gets the eval file's `eval_prompt` with {question} and {answer} filled in and must
answer with one token: a number 0..100 or REFUSAL. We ask for one token with its top-20
log-probabilities and score the probability-weighted mean of the numeric tokens; a reply whose
numeric tokens carry under 25 % of the mass is not a score (invalid), and one where REFUSAL
outweighs the numbers is counted as a refusal. Key from env `NPC_JUDGE_API_KEY`.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

from pruning import PruneError
from pruning.chat import messages

KEY_ENV = "NPC_JUDGE_API_KEY"
MIN_NUMERIC_MASS = 0.25


def score_logprobs(top: list[tuple[str, float]]) -> tuple[str, float | None]:
    """('score', value) | ('refusal', None) | ('invalid', None) from (token, logprob) pairs."""
    numeric, weighted, refusal = 0.0, 0.0, 0.0
    for token, lp in top:
        t = token.strip()
        p = math.exp(lp)
        if t.isdigit() and 0 <= int(t) <= 100:
            numeric += p
            weighted += p * int(t)
        elif t and "REFUSAL".startswith(t.upper()) and len(t) >= 2:
            refusal += p
    if refusal > numeric:
        return "refusal", None
    if numeric < MIN_NUMERIC_MASS:
        return "invalid", None
    return "score", weighted / numeric


def judge(url: str, model: str, eval_prompt: str, questions: list[str], answers: list[str], *,
          concurrency: int = 4) -> dict:
    """{judge: mean score 0..100 or None, judge_scores, judge_refusals, judge_invalid}."""
    try:
        from openai import OpenAI
    except ImportError:
        raise PruneError("the judge needs the `openai` package") from None
    if "{question}" not in eval_prompt or "{answer}" not in eval_prompt:
        raise PruneError("eval_prompt must contain {question} and {answer}")
    client = OpenAI(base_url=url, api_key=os.environ.get(KEY_ENV) or "unused", max_retries=3, timeout=120)

    def one(qa: tuple[str, str]):
        q, a = qa
        prompt = eval_prompt.replace("{question}", q).replace("{answer}", a)
        r = client.chat.completions.create(model=model, messages=messages(prompt),
                                           max_tokens=1, temperature=0, logprobs=True, top_logprobs=20, seed=0)
        lp = r.choices[0].logprobs
        if not lp or not lp.content:
            return "invalid", None
        return score_logprobs([(t.token, t.logprob) for t in lp.content[0].top_logprobs])

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            results = list(ex.map(one, zip(questions, answers)))
    except Exception as e:
        raise PruneError(f"judge {url} ({model}) failed: {type(e).__name__}: {e}") from None
    scores = [v for kind, v in results if kind == "score"]
    return {"judge": sum(scores) / len(scores) if scores else None, "judge_scores": [
        round(v, 2) if v is not None else kind for kind, v in results],
        "judge_refusals": sum(k == "refusal" for k, _ in results),
        "judge_invalid": sum(k == "invalid" for k, _ in results)}
