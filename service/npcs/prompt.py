"""The prompt an NPC chats under, assembled from its record, its card and the conversation: system
prompt with triggered lore and example dialogue, the chosen greeting, the history, then the card's
post-history instructions. Chats, sessions, scenes and the prompt preview all build it here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pruning.chat import chat_ids
from service.errors import ApiError
from service.npcs import lore
from service.npcs.cards import substitute
from service.npcs.persona import system_prompt_of

_START = re.compile(r"^\s*<START>\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass
class Assembled:
    ids: list[int]
    messages: list[dict]
    lore: list[str] = field(default_factory=list)  # the keys of the injected entries

    def text(self, tok) -> str:
        return tok.decode(self.ids)


def char_name(rec: dict, card: dict | None) -> str:
    """What {{char}} stands for: the card's nickname (V3) when it has one."""
    nick = (card or {}).get("nickname")
    return nick.strip() if isinstance(nick, str) and nick.strip() else rec["name"]


def greetings(rec: dict, card: dict | None) -> list[str]:
    """Greeting 0 is the card's first message; 1.. its alternate greetings."""
    out = [rec["greeting"]] if rec.get("greeting") else []
    alts = (card or {}).get("alternate_greetings")
    if isinstance(alts, list):
        char = char_name(rec, card)
        out += [substitute(a, char) for a in alts if isinstance(a, str) and a.strip()]
    return out


def greeting(rec: dict, card: dict | None, index: int | None, user: str = "User") -> str | None:
    options = greetings(rec, card)
    if index is None:
        return substitute(options[0], char_name(rec, card), user) if options else None
    if not 0 <= index < len(options):
        raise ApiError(400, f"greeting_index {index}: this NPC has {len(options)} greeting(s)",
                       param="greeting_index", code="invalid_value")
    return substitute(options[index], char_name(rec, card), user)


def _examples(card: dict | None, char: str, user: str) -> str | None:
    raw = (card or {}).get("mes_example")
    if not isinstance(raw, str) or not raw.strip():
        return None
    blocks = [b.strip() for b in _START.split(raw) if b.strip()]
    text = substitute("\n\n".join(blocks), char, user)
    return f"Example dialogue, for {char}'s voice only (not part of this conversation):\n{text}"


def _system(rec: dict, card: dict | None, entries: list, char: str, user: str, extra: list[str]) -> str:
    """The system message: the lore placed before the NPC's own prompt, the lore placed after it,
    the example dialogue, then anything the caller adds."""
    before = [substitute(e.content, char, user) for e in entries if e.position == "before_char"]
    after = [substitute(e.content, char, user) for e in entries if e.position == "after_char"]
    parts = before + [system_prompt_of(rec)] + after + [_examples(card, char, user) or ""] + list(extra)
    return "\n\n".join(p for p in parts if p)


LORE_QUESTIONS = ("What can you tell me about {key}?", "What does {key} mean to you?")
MAX_LORE_QUESTIONS = 32


def pruning_inputs(rec: dict, card: dict | None) -> tuple[str, list[str]]:
    """What an NPC's pruning data is written under: (system prompt, questions always asked).

    Without a card: the NPC's system prompt, no questions. With one: questions on its lorebook's
    topics (each entry's first plain key, in LORE_QUESTIONS' forms), and the system prompt its chats
    get when those topics come up: the lore they key (within the book's budget, tokens counted as
    characters / 4) and the card's example dialogue, which every chat's prompt holds."""
    book = lore.book_of(card)
    questions: list[str] = []
    for e in book.entries if book else ():
        plain = [k for k in e.keys if not e.regex and not k.startswith("/")][:1]
        questions += [t.format(key=k) for k in plain for t in LORE_QUESTIONS]
    questions = list(dict.fromkeys(questions))[:MAX_LORE_QUESTIONS]
    entries = lore.select(book, ["\n".join(questions)], lambda s: len(s) // 4)
    return _system(rec, card, entries, char_name(rec, card), "User", []), questions


def assemble(rec: dict, card: dict | None, turns: list[dict], tok, *, extra_system: list[str] = (),
             greeting_index: int | None = None, user: str = "User", summary: str | None = None) -> Assembled:
    """The NPC's prompt for `turns` (chat messages after the system prompt). `summary` is a
    session's memory of turns no longer in `turns`."""
    char = char_name(rec, card)
    opening = greeting(rec, card, greeting_index, user)
    if not opening or summary or (turns and turns[0]["role"] == "assistant"):
        opening = None  # the greeting opens the conversation (as in a chat front-end) unless the client's does
    shown = ([{"role": "assistant", "content": opening}] if opening else []) + list(turns)
    book = lore.book_of(card)
    entries = lore.select(book, [t["content"] for t in shown if t.get("content")],
                          lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    memory = [f"What happened earlier in this conversation: {summary}"] if summary else []
    msgs = [{"role": "system", "content": _system(rec, card, entries, char, user, memory + list(extra_system))}] + shown
    post = (card or {}).get("post_history_instructions")
    if isinstance(post, str) and post.strip():
        post = substitute(post.replace("{{original}}", ""), char, user).strip()
        if post:
            msgs.append({"role": "system", "content": post})
    try:
        ids = chat_ids(tok, msgs)
    except Exception:  # a template that allows no system turn after the history: told with the last turn
        if len(msgs) < 2 or msgs[-1]["role"] != "system":
            raise
        last = msgs.pop()
        msgs[-1] = {**msgs[-1], "content": f"{msgs[-1]['content']}\n\n({last['content']})"}
        ids = chat_ids(tok, msgs)
    return Assembled(ids, msgs, [e.key for e in entries])
