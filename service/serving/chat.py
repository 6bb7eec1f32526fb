"""/v1/chat/completions: the NPC's persona as the system prompt, its chat template, OpenAI responses."""

from __future__ import annotations

import secrets
import time

from pruning.chat import chat_ids
from service import metrics
from service.errors import ApiError
from service.npcs.persona import system_prompt_of
from service.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                              ChunkChoice, Usage, chunk_json)
from service.serving.base import DEFAULT_TEMPERATURE, Serving, finish_reason


def chat_logprobs(out, tok, n_top: int) -> dict | None:
    if out.logprobs is None:
        return None

    def item(tid: int, logprob: float) -> dict:
        text = tok.decode([tid])
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, lp in zip(out.token_ids, out.logprobs):
        chosen = lp.get(tid)
        top = sorted(lp.items(), key=lambda kv: -kv[1].logprob)[:n_top]
        content.append({**item(tid, chosen.logprob if chosen else float("-inf")),
                        "top_logprobs": [item(t, v.logprob) for t, v in top]})
    return {"content": content, "refusal": None}


class ChatServing(Serving):
    def build_prompt(self, rec: dict, req: ChatCompletionRequest, tok) -> list[int]:
        sys_text = system_prompt_of(rec)
        extra = [m.text() for m in req.messages if m.role in ("system", "developer") and m.text()]
        if extra:
            sys_text += "\n\n" + "\n\n".join(extra)
        msgs = [{"role": "system", "content": sys_text}]
        turns = [{"role": m.role if m.role != "tool" else "user", "content": m.text()}
                 for m in req.messages if m.role not in ("system", "developer")]
        if rec.get("greeting") and (not turns or turns[0]["role"] != "assistant"):
            # the card's greeting opens the conversation, as it does in a chat front-end
            msgs.append({"role": "assistant", "content": rec["greeting"]})
        msgs += turns
        return chat_ids(tok, msgs)

    def build_prompts(self, rec: dict, req, tok) -> list[list[int]]:
        return [self.build_prompt(rec, req, tok)]

    def sampling_params(self, req: ChatCompletionRequest, prompt_len: int, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        limit = self.settings.max_model_len
        max_tokens = req.max_completion_tokens or req.max_tokens or self.settings.default_max_tokens
        if prompt_len >= limit:
            raise ApiError(400, f"prompt is {prompt_len} tokens with the persona; this NPC's context "
                           f"limit is {limit} tokens", param="messages", code="context_length_exceeded")
        max_tokens = min(max_tokens, limit - prompt_len)
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        return SamplingParams(
            n=req.n,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_tokens=max_tokens,
            stop=stop or None,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    async def complete(self, req: ChatCompletionRequest, who=None, meta: dict | None = None) -> dict:
        p = await self.prepare(req, who, meta)
        label = metrics.npc_label(req.model)
        t0 = time.time()
        rid = "chatcmpl-" + secrets.token_hex(12)
        (final,) = await self.generate_final(p, rid)
        elapsed = time.time() - t0
        n_prompt = len(p.prompts[0])
        choices, n_completion = [], 0
        for o in sorted(final.outputs, key=lambda o: o.index):
            n_completion += len(o.token_ids)
            choices.append(ChatChoice(
                index=o.index, message=AssistantMessage(content=o.text),
                finish_reason=finish_reason(o.finish_reason) or "stop",
                logprobs=chat_logprobs(o, p.tok, req.top_logprobs or 0) if req.logprobs else None))
        self.count_done(label, "ok", n_prompt, n_completion, elapsed)
        metrics.TTFT.labels(npc=label).observe(elapsed)  # not streamed: the first token arrives with the rest
        return ChatCompletion(id=rid, created=int(t0), model=req.model, choices=choices,
                              usage=Usage.of(n_prompt, n_completion), system_fingerprint=p.fingerprint).model_dump()

    async def stream(self, req: ChatCompletionRequest, who=None, meta: dict | None = None):
        """Validate and reserve first (errors become HTTP statuses), then return the event iterator."""
        p = await self.prepare(req, who, meta)
        label = metrics.npc_label(req.model)
        rid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n_prompt = len(p.prompts[0])
        outputs, release = await self.generate_stream(p, rid)

        def chunk(choices: list, usage: Usage | None = None) -> str:
            return chunk_json(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices,
                                                  system_fingerprint=p.fingerprint, usage=usage), include_usage)

        async def body(t0: float, counted: list[int]):
            last = None
            yield chunk([ChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(req.n)])
            async for _, out in outputs:
                now = time.time()
                if last is None:
                    metrics.TTFT.labels(npc=label).observe(now - t0)
                else:
                    metrics.ITL.labels(npc=label).observe(now - last)
                last = now
                choices = []
                for o in out.outputs:
                    counted[0] += len(o.token_ids)
                    if not o.text and o.finish_reason is None:
                        continue
                    choices.append(ChunkChoice(
                        index=o.index, delta={"content": o.text} if o.text else {},
                        finish_reason=finish_reason(o.finish_reason),
                        logprobs=chat_logprobs(o, p.tok, req.top_logprobs or 0) if req.logprobs else None))
                if choices:
                    yield chunk(choices)
            if include_usage:
                yield chunk([], Usage.of(n_prompt, counted[0]))

        return self.sse(label, n_prompt, release, body), release
