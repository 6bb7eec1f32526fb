"""Lorebook selection (Character Card V2/V3 `character_book`), by the rules the specs give."""

from __future__ import annotations

from service.npcs import lore


def _book(*entries, **book) -> lore.Book:
    return lore.book_of({"character_book": {"entries": list(entries), **book}})


def _keys(book, *messages, count=lambda s: len(s.split())) -> list[str]:
    return [e.key for e in lore.select(book, list(messages), count)]


def e(key, keys, content=None, **kw) -> dict:
    return {"id": key, "keys": keys, "content": content or f"lore about {key}", "enabled": True,
            "insertion_order": 100, **kw}


def test_keys_match_whole_words_case_insensitively():
    book = _book(e("forest", ["forest"]), e("beast", ["Beast"]))
    assert _keys(book, "The FOREST is dark") == ["forest"]
    assert _keys(book, "a forestry job") == []  # a whole word, not a substring
    assert _keys(book, "hello there") == []
    assert _keys(book, "a beast!") == ["beast"]


def test_case_sensitive_secondary_keys_and_regex():
    book = _book(e("cs", ["Eldoria"], case_sensitive=True),
                 e("sel", ["sword"], selective=True, secondary_keys=["fire", "ice"]),
                 e("rx", ["/dragons?\\b/i"]),
                 e("v3", ["^gold(en)?"], use_regex=True),
                 e("broken", ["/([/"]))
    assert _keys(book, "eldoria") == [] and _keys(book, "Eldoria") == ["cs"]
    assert _keys(book, "a sword") == [] and _keys(book, "a sword of fire") == ["sel"]
    assert _keys(book, "two DRAGONS") == ["rx"]
    assert _keys(book, "golden hall") == ["v3"] and _keys(book, "the gold") == []


def test_constant_disabled_depth_order_budget_priority():
    book = _book(e("late", ["ship"], insertion_order=300), e("always", [], constant=True, insertion_order=200),
                 e("off", ["ship"], enabled=False), e("early", ["storm"], insertion_order=10),
                 scan_depth=2)
    assert _keys(book, "storm", "the ship sails") == ["early", "always", "late"]
    assert _keys(book, "storm", "calm", "the ship sails") == ["always", "late"]  # storm is 3 messages back

    tight = _book(e("a", ["x"], "one two three", priority=1), e("b", ["x"], "four five", priority=5),
                  e("c", ["x"], "six", priority=3, insertion_order=1), token_budget=4)
    assert _keys(tight, "x") == ["c", "b"]  # 'a' (lowest priority) is left out first; order by insertion


def test_recursive_scanning():
    entries = (e("a", ["castle"], "the castle has a dragon"), e("b", ["dragon"], "the dragon sleeps"))
    assert _keys(_book(*entries), "the castle") == ["a"]
    assert sorted(_keys(_book(*entries, recursive_scanning=True), "the castle")) == ["a", "b"]


def test_no_book():
    assert lore.book_of({}) is None and lore.select(None, ["x"], len) == []
    assert lore.book_of({"character_book": {"entries": [{"keys": [], "content": "x"}]}}) is None
