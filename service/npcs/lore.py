"""A card's lorebook (`character_book`, Character Card V2/V3): which entries enter the prompt.

An entry is injected when one of its keys appears in the last `scan_depth` messages (and, when it
is `selective`, one of its secondary keys too); `constant` entries always are. Keys match whole
words, case-insensitively unless `case_sensitive`; a key written `/pattern/flags` (SillyTavern), or
any key of an entry with `use_regex` (V3), is a regular expression. Chosen entries go in
`insertion_order`; when they exceed the token budget, the lowest `priority` ones are left out
first. With `recursive_scanning`, injected entries' text is scanned for more keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SCAN_DEPTH = 4
DEFAULT_TOKEN_BUDGET = 512
MAX_RECURSION = 3
_SLASH_REGEX = re.compile(r"^/(.+)/([imsu]*)$", re.DOTALL)


@dataclass(frozen=True)
class Entry:
    key: str  # the entry's id or name: how a preview names it
    content: str
    keys: tuple[str, ...]
    secondary: tuple[str, ...]
    selective: bool
    constant: bool
    case_sensitive: bool
    regex: bool
    order: int
    priority: int
    position: str  # "before_char" | "after_char"


@dataclass(frozen=True)
class Book:
    entries: tuple[Entry, ...]
    scan_depth: int
    token_budget: int
    recursive: bool


def _int(v, default: int) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def book_of(card: dict | None) -> Book | None:
    """The card's lorebook with defaults filled in, enabled entries only; None without one."""
    raw = (card or {}).get("character_book")
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        return None
    entries = []
    for i, e in enumerate(raw["entries"]):
        if not isinstance(e, dict) or e.get("enabled") is False or not str(e.get("content") or "").strip():
            continue
        keys = tuple(str(k) for k in e.get("keys") or () if str(k).strip())
        constant = bool(e.get("constant"))
        if not keys and not constant:
            continue
        entries.append(Entry(
            key=str(e.get("id", e.get("name") or i)), content=str(e["content"]).strip(), keys=keys,
            secondary=tuple(str(k) for k in e.get("secondary_keys") or () if str(k).strip()),
            selective=bool(e.get("selective")), constant=constant, case_sensitive=bool(e.get("case_sensitive")),
            regex=bool(e.get("use_regex")), order=_int(e.get("insertion_order"), 100),
            priority=_int(e.get("priority"), 0),
            position="after_char" if e.get("position") == "after_char" else "before_char"))
    if not entries:
        return None
    return Book(tuple(entries), max(1, _int(raw.get("scan_depth"), DEFAULT_SCAN_DEPTH)),
                max(1, _int(raw.get("token_budget"), DEFAULT_TOKEN_BUDGET)), bool(raw.get("recursive_scanning")))


def _pattern(key: str, entry: Entry) -> re.Pattern | None:
    flags = 0 if entry.case_sensitive else re.IGNORECASE
    slash = _SLASH_REGEX.match(key)
    try:
        if slash:
            for f in slash.group(2):
                flags |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "u": 0}[f]
            return re.compile(slash.group(1), flags)
        if entry.regex:
            return re.compile(key, flags)
    except re.error:
        return None  # a broken pattern of a card never matches (and never fails a chat)
    # whole words where the key starts/ends with a word character; else plain substring
    left = r"\b" if re.match(r"\w", key) else ""
    right = r"\b" if re.search(r"\w$", key) else ""
    return re.compile(left + re.escape(key) + right, flags)


def _hits(keys: tuple[str, ...], entry: Entry, text: str) -> bool:
    for k in keys:
        p = _pattern(k, entry)
        if p is not None and p.search(text):
            return True
    return False


def _keyed(entry: Entry, text: str) -> bool:
    if entry.constant:
        return True
    if not _hits(entry.keys, entry, text):
        return False
    return not (entry.selective and entry.secondary) or _hits(entry.secondary, entry, text)


def select(book: Book | None, messages: list[str], count_tokens) -> list[Entry]:
    """The entries this conversation triggers (its last `scan_depth` messages), in insertion order,
    within the book's token budget; `count_tokens(text) -> int`."""
    if book is None:
        return []
    text = "\n".join(messages[-book.scan_depth:])
    chosen: dict[str, Entry] = {}
    for _ in range(MAX_RECURSION if book.recursive else 1):
        new = [e for e in book.entries if e.key not in chosen and _keyed(e, text)]
        if not new:
            break
        chosen.update((e.key, e) for e in new)
        text += "\n" + "\n".join(e.content for e in new)
    kept, used = [], 0
    for e in sorted(chosen.values(), key=lambda e: (-e.priority, e.order)):
        cost = count_tokens(e.content)
        if used + cost <= book.token_budget:
            kept.append(e)
            used += cost
    return sorted(kept, key=lambda e: e.order)
