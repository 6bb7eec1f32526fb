"""A session's turn: its history as a chat completion, folded into a rolling summary written by the
dense base whenever it would no longer fit the session's context budget, so a conversation never
hits the context limit."""

from __future__ import annotations

import json
import secrets

from pruning.chat import chat_ids
from service.errors import ApiError
from service.npcs.prompt import char_name
from service.npcs.sessions import SessionStore
from service.npcs.threads import release_lock
from service.protocol import ChatCompletionRequest
from service.serving.base import Prepared, npc_weights, tokenizer_of
from service.serving.chat import ChatServing

KEEP_TURNS = 4  # the latest messages are never folded: the reply needs them word for word
SUMMARY_TOKENS = 64


def _line(m: dict, char: str, user: str) -> str:
    return f"{char if m['role'] == 'assistant' else user}: {m['content']}"


class SessionServing:
    def __init__(self, chat: ChatServing, sessions: SessionStore):
        self.chat, self.sessions = chat, sessions

    def request(self, doc: dict, turns: list[dict], body) -> ChatCompletionRequest:
        req = ChatCompletionRequest(
            model=doc["npc"], messages=[{"role": m["role"], "content": m["content"]} for m in turns],
            greeting_index=doc.get("greeting_index"), max_tokens=body.max_tokens, temperature=body.temperature,
            stream=body.stream, stream_options={"include_usage": True} if body.stream else None,
            response_format=body.response_format, seed=body.seed)
        req._summary = doc.get("summary")
        return req

    async def _prompt_tokens(self, req: ChatCompletionRequest, who) -> tuple[int, dict]:
        rec, ck, _ = await self.chat.resolve(req.model, who)
        return len(self.chat.assembled(rec, req, tokenizer_of(ck)).ids), rec

    async def fit(self, doc: dict, who, body) -> tuple[dict, ChatCompletionRequest]:
        """The session, with as many old turns folded into its summary as it takes for the prompt and
        the reply to fit its budget, and the request of this turn."""
        limit = self.chat.settings.max_model_len
        budget = min(doc.get("context_tokens") or limit, limit)
        reply = body.max_tokens or self.chat.settings.default_max_tokens
        if reply >= budget // 2:
            raise ApiError(400, f"max_tokens {reply} leaves no room for the conversation in this session's "
                           f"{budget}-token budget", param="max_tokens", code="invalid_value")
        history = await self.sessions.messages(doc["id"])
        turn = {"role": "user", "content": body.content}
        while True:
            live = history[doc["folded"]:] + [turn]
            req = self.request(doc, live, body)
            n, rec = await self._prompt_tokens(req, who)
            if n + reply <= budget:
                return doc, req
            fold = len(live) - 1 - KEEP_TURNS
            if fold <= 0:
                raise ApiError(400, f"this message and the latest turns need {n} tokens, over the session's "
                               f"{budget - reply}-token room for the prompt; send a shorter message",
                               param="content", code="context_length_exceeded")
            summary = await self.summarize(rec, doc, live[:fold])
            doc = await self.sessions.update(doc["id"], summary=summary, folded=doc["folded"] + fold,
                                             folds=doc.get("folds", 0) + 1)

    async def summarize(self, rec: dict, doc: dict, turns: list[dict]) -> str:
        """The session's memory with `turns` folded in, written by the dense base (no persona)."""
        char, user = char_name(rec, rec.get("card")), doc.get("user") or "User"
        ck = await self.chat._open_base(rec["id"], rec["base"])
        tok = tokenizer_of(ck)
        earlier = f"What happened before: {doc['summary']}\n\n" if doc.get("summary") else ""
        lines = "\n".join(_line(m, char, user) for m in turns)
        msgs = [{"role": "system", "content": "You keep short, factual notes of a conversation."},
                {"role": "user", "content": f"{earlier}The conversation goes on:\n{lines}\n\nIn at most 40 words, "
                 f"write what {char} must remember from all of this: names, facts, promises, the mood."}]
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids = chat_ids(tok, msgs)[-(self.chat.settings.max_model_len - SUMMARY_TOKENS):]
        params = SamplingParams(temperature=0, max_tokens=SUMMARY_TOKENS, output_kind=RequestOutputKind.FINAL_ONLY)
        p = Prepared("", npc_weights(rec["id"], ck), tok, [ids], params, None)
        (final,) = await self.chat.generate_final(p, "memory-" + secrets.token_hex(8))
        text = final.outputs[0].text.strip()
        return text or (doc.get("summary") or "")

    async def reply(self, doc: dict, who, body) -> dict:
        """One turn: the player's message, the NPC's answer, both kept."""
        async with self.sessions.lock(doc["id"]):
            doc = await self.sessions.get(doc["id"])
            doc, req = await self.fit(doc, who, body)
            out = await self.chat.complete(req, who)
            answer = out["choices"][0]["message"]["content"] or ""
            doc = await self.sessions.append(doc["id"], {"role": "user", "content": body.content},
                                             {"role": "assistant", "content": answer})
            return {"id": doc["id"], "object": "npc.session.reply", "message": {"role": "assistant", "content": answer},
                    "finish_reason": out["choices"][0]["finish_reason"], "usage": out["usage"],
                    "summary": doc.get("summary"), "folded": doc["folded"]}

    async def stream(self, doc: dict, who, body):
        """As `reply`, streamed as chat.completion.chunk events; the turn is kept when the stream ends
        whole (a stream cut short keeps nothing)."""
        lock = self.sessions.lock(doc["id"])
        await lock.acquire()
        try:
            doc = await self.sessions.get(doc["id"])
            doc, req = await self.fit(doc, who, body)
            events, release = await self.chat.stream(req, who)
        except BaseException:
            await release_lock(lock)
            raise

        async def body_events():
            parts, done = [], False
            try:
                async for data in events:
                    if data == "[DONE]":
                        done = True
                    else:
                        for c in json.loads(data).get("choices", []):
                            parts.append((c.get("delta") or {}).get("content") or "")
                    yield data
                if done:
                    await self.sessions.append(doc["id"], {"role": "user", "content": body.content},
                                               {"role": "assistant", "content": "".join(parts)})
            finally:
                await release_lock(lock)

        return body_events(), release
