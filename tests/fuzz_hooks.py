"""Schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS): about half of the
generated cases name the server's ready NPC, so chat, prompt, card and load routes run past the
record lookup into the engines (their chats with one real user turn: drawn messages are
mostly refused before an engine is reached); generation stays short (a drawn max_tokens of thousands would make
every case minutes long)."""

from __future__ import annotations

import os

import schemathesis

NPC = os.environ.get("NPC_FUZZ_NPC", "")
MAX_TOKENS = 8


def _pick(value) -> bool:
    return len(repr(value)) % 2 == 0  # deterministic for a given case, about half of them


@schemathesis.hook
def map_path_parameters(ctx, params):
    # DELETE keeps its random id: deleting the ready NPC would end the run's chats
    if params and "npc_id" in params and ctx.operation.method.upper() != "DELETE" and _pick(params):
        params["npc_id"] = NPC
    return params


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        if "model" in body and _pick(body):
            body["model"] = NPC
            if "messages" in body:  # drawn messages are mostly refused (400): give these a real turn
                body["messages"] = [{"role": "user", "content": "Who are you?"}]
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
    return body
