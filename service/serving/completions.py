"""/v1/completions (legacy text completions) on an NPC's model.

A raw continuation: no persona, no chat template, so a game can frame its own text
(barks, item descriptions, a line of dialogue after its own script). The NPC's
pruned weights are what make it that NPC here; /v1/chat/completions applies the persona.
"""

from __future__ import annotations

import secrets
import time

from service import metrics
from service.errors import ApiError
from service.protocol import CompletionRequest, TextChoice, TextCompletion, Usage, chunk_json
from service.serving.base import DEFAULT_TEMPERATURE, Serving, finish_reason


class CompletionServing(Serving):
    def build_prompts(self, rec: dict, req: CompletionRequest, tok) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts = [tok.encode(prompt, add_special_tokens=False)]
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]
        elif isinstance(prompt[0], str):
            prompts = [tok.encode(p, add_special_tokens=False) for p in prompt]
        else:
            prompts = [list(p) for p in prompt]
        vocab = len(tok)
        for ids in prompts:
            if not ids:
                raise ApiError(400, "prompt is empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt has token ids outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
        return prompts

    def sampling_params(self, req: CompletionRequest, prompt_len: int, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, "best_of must equal n (server-side best-of is not supported)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        limit = self.settings.max_model_len
        if prompt_len >= limit:
            raise ApiError(400, f"prompt is {prompt_len} tokens; this NPC's context limit is {limit} tokens",
                           param="prompt", code="context_length_exceeded")
        max_tokens = min(req.max_tokens or 16, limit - prompt_len)  # OpenAI's default for completions: 16
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        return SamplingParams(
            n=req.n,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_tokens=max_tokens, min_tokens=min(req.min_tokens or 0, max_tokens), stop=stop or None, seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=req.logprobs,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    @staticmethod
    def _text_logprobs(o, tok, n_top: int, offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lp in zip(o.token_ids, o.logprobs or []):
            text = tok.decode([tid])
            chosen = lp.get(tid)
            tokens.append(text)
            token_lps.append(float(chosen.logprob) if chosen else float("-inf"))
            top = sorted(lp.items(), key=lambda kv: -kv[1].logprob)[:n_top]
            tops.append({tok.decode([t]): float(v.logprob) for t, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _echo(self, p, i: int) -> str:
        return p.tok.decode(p.prompts[i]) if p.echo else ""

    async def complete(self, req: CompletionRequest, who=None, meta: dict | None = None) -> dict:
        p = await self.prepare(req, who, meta)
        p.echo = req.echo
        label = metrics.npc_label(req.model)
        t0 = time.time()
        rid = "cmpl-" + secrets.token_hex(12)
        finals = await self.generate_final(p, rid)
        choices, n_completion = [], 0
        for i, final in enumerate(finals):
            echo = self._echo(p, i)
            for o in sorted(final.outputs, key=lambda o: o.index):
                n_completion += len(o.token_ids)
                choices.append(TextChoice(
                    index=i * req.n + o.index, text=echo + o.text,
                    finish_reason=finish_reason(o.finish_reason) or "stop",
                    logprobs=self._text_logprobs(o, p.tok, req.logprobs, len(echo))
                    if req.logprobs is not None else None))
        n_prompt = sum(len(x) for x in p.prompts)
        self.count_done(label, "ok", n_prompt, n_completion, time.time() - t0)
        return TextCompletion(id=rid, created=int(t0), model=req.model, choices=choices,
                              usage=Usage.of(n_prompt, n_completion), system_fingerprint=p.fingerprint).model_dump()

    async def stream(self, req: CompletionRequest, who=None, meta: dict | None = None):
        p = await self.prepare(req, who, meta)
        p.echo = req.echo
        label = metrics.npc_label(req.model)
        rid = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        outputs, release = await self.generate_stream(p, rid)
        n_prompt = sum(len(x) for x in p.prompts)

        def chunk(choices: list, usage: Usage | None = None) -> str:
            return chunk_json(TextCompletion(id=rid, created=created, model=req.model, choices=choices,
                                             system_fingerprint=p.fingerprint, usage=usage), include_usage)

        async def body(t0: float, counted: list[int]):
            offsets: dict[int, int] = {}
            if req.echo:
                yield chunk([TextChoice(index=i * req.n + j, text=self._echo(p, i), finish_reason=None)
                             for i in range(len(p.prompts)) for j in range(req.n)])
            async for i, out in outputs:
                if not offsets:
                    metrics.TTFT.labels(npc=label).observe(time.time() - t0)
                choices = []
                for o in out.outputs:
                    counted[0] += len(o.token_ids)
                    if not o.text and o.finish_reason is None:
                        continue
                    idx = i * req.n + o.index
                    lp = None
                    if req.logprobs is not None:
                        lp = self._text_logprobs(o, p.tok, req.logprobs, offsets.get(idx, 0))
                    offsets[idx] = offsets.get(idx, 0) + len(o.text)
                    choices.append(TextChoice(index=idx, text=o.text, finish_reason=finish_reason(o.finish_reason),
                                              logprobs=lp))
                if choices:
                    yield chunk(choices)
            if include_usage:
                yield chunk([], Usage.of(n_prompt, counted[0]))

        return self.sse(label, n_prompt, release, body), release
