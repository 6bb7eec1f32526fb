"""/v1/chat/completions: the NPC's persona as the system prompt, its chat template, OpenAI responses."""

from __future__ import annotations

import secrets
import time

from service import metrics
from service.errors import ApiError
from service.npcs.prompt import assemble
from service.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                              ChunkChoice, Usage, chunk_json)
from service.serving import structured
from service.serving.base import DEFAULT_TEMPERATURE, Serving, finish_reason, tokenizer_of


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


def turn(m) -> dict:
    """One history message as the chat template sees it: a tool's result is told to the model as a
    user turn, its own earlier calls as the text it would have written."""
    if m.role == "tool":
        return {"role": "user", "content": f"Result of {m.name or m.tool_call_id or 'the call'}: {m.text()}"}
    if m.role == "assistant" and m.tool_calls:
        return {"role": "assistant", "content": m.text() + structured.call_text(m.tool_calls)}
    return {"role": m.role, "content": m.text()}


class ChatServing(Serving):
    @staticmethod
    def assembled(rec: dict, req: ChatCompletionRequest, tok):
        extra = [m.text() for m in req.messages if m.role in ("system", "developer") and m.text()]
        extra.append(structured.tools_prompt(req) or "")
        turns = [turn(m) for m in req.messages if m.role not in ("system", "developer")]
        return assemble(rec, rec.get("card"), turns, tok, extra_system=[e for e in extra if e],
                        greeting_index=req.greeting_index, summary=req._summary)

    async def preview(self, req: ChatCompletionRequest, who=None) -> dict:
        """The prompt a chat would run, as text and token count, and the lore entries it injects."""
        rec, ck, _ = await self.resolve(req.model, who)
        tok = tokenizer_of(ck)
        a = self.assembled(rec, req, tok)
        return {"id": rec["id"], "object": "npc.prompt", "prompt": a.text(tok), "prompt_tokens": len(a.ids),
                "messages": a.messages, "lore": a.lore}

    def build_prompts(self, rec: dict, req, tok) -> list[list[int]]:
        return [self.assembled(rec, req, tok).ids]

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
            max_tokens=max_tokens, min_tokens=min(req.min_tokens or 0, max_tokens),
            stop=stop or None,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            structured_outputs=structured.constraint(req),
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
            content, calls, finish = structured.split_calls(req, o.text, finish_reason(o.finish_reason) or "stop")
            choices.append(ChatChoice(
                index=o.index, message=AssistantMessage(content=content, tool_calls=calls),
                finish_reason=finish,
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

        held = {i: "" for i in range(req.n)} if req.calls_tools() else None

        def with_calls(o, delta: dict, finish: str | None) -> tuple[dict, str | None]:
            """With tools, an answer is held back whole: only then is it known to be prose or a call."""
            held[o.index] += o.text
            if finish is None:
                return {}, None
            content, calls, finish = structured.split_calls(req, held[o.index], finish)
            delta = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = [{"index": k, **c.model_dump()} for k, c in enumerate(calls)]
            return delta, finish

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
                    delta, finish = ({"content": o.text} if o.text else {}), finish_reason(o.finish_reason)
                    if held is not None:
                        delta, finish = with_calls(o, delta, finish)
                    if not delta and finish is None:
                        continue
                    choices.append(ChunkChoice(
                        index=o.index, delta=delta, finish_reason=finish,
                        logprobs=chat_logprobs(o, p.tok, req.top_logprobs or 0) if req.logprobs else None))
                if choices:
                    yield chunk(choices)
            if include_usage:
                yield chunk([], Usage.of(n_prompt, counted[0]))

        return self.sse(label, n_prompt, release, body), release
