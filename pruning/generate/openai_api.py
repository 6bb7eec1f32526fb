"""An OpenAI-compatible chat endpoint as the teacher (`teacher_url`, `teacher_model`; key from env
`NPC_TEACHER_API_KEY`)."""

from __future__ import annotations

import os

from pruning import PruneError
from pruning.chat import messages

TEACHER_KEY_ENV = "NPC_TEACHER_API_KEY"


def openai_answers(system: str | None, questions: list[str], max_new_tokens: int, *, url: str, model: str,
                   temperature: float = 0.0, seed: int = 0, concurrency: int = 8) -> list[tuple[str, bool]]:
    """(answer, finished) per question from the endpoint's chat completions."""
    try:
        from openai import OpenAI
    except ImportError:
        raise PruneError("teacher_url needs the `openai` package") from None
    from concurrent.futures import ThreadPoolExecutor

    client = OpenAI(base_url=url, api_key=os.environ.get(TEACHER_KEY_ENV) or "unused", max_retries=3)

    def one(q: str) -> tuple[str, bool]:
        r = client.chat.completions.create(model=model, messages=messages(q, system), max_tokens=max_new_tokens,
                                           temperature=temperature, seed=seed)
        c = r.choices[0]
        return (c.message.content or "").strip(), c.finish_reason == "stop"

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            return list(ex.map(one, questions))
    except Exception as e:  # network, auth, model name: a user-facing failure
        raise PruneError(f"teacher {url} ({model}) failed: {type(e).__name__}: {e}") from None
