"""Chats as token ids, written once: every prompt this project builds goes through here.

`chat_ids` is the base model's chat template applied and tokenised (transformers renders the
template and tokenises the text without adding special tokens, so it is the same as
``tok(apply_chat_template(..., tokenize=False), add_special_tokens=False)``; tested). Importable
without torch.
"""

from __future__ import annotations


def messages(user: str, system: str | None = None, history: list[tuple[str, str]] = ()) -> list[dict]:
    """[system], then each earlier (user, assistant) turn of `history`, then `user`."""
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": user}]


def chat_ids(tok, msgs: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `msgs` under the tokenizer's chat template (by default ending with the assistant
    generation header)."""
    ids = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(tok, user: str, system: str | None = None, max_user_tokens: int | None = None) -> list[int]:
    """The chat prompt of one question. `max_user_tokens` caps what follows the system prompt, never
    the system prompt itself (which is what a persona-conditioned score measures: cutting it dropped
    the question altogether behind a long persona)."""
    msgs = messages(user, system)
    ids = chat_ids(tok, msgs)
    if max_user_tokens is None:
        return ids
    head = len(chat_ids(tok, msgs[:1], add_generation_prompt=False)) if system else 0
    return ids[:head + max_user_tokens]


def end_of_turn_id(tok) -> int | None:
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i >= 0:
            return i
    return tok.eos_token_id


def answer_ids(tok, answer: str, finished: bool = True) -> list[int]:
    """The assistant tokens a model is trained/scored on: the answer, plus end-of-turn if it ended."""
    ids = list(tok(answer, add_special_tokens=False)["input_ids"])
    eot = end_of_turn_id(tok)
    if finished and eot is not None:
        ids.append(eot)
    return ids


def pad_id_of(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
