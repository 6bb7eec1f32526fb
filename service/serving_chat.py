"""/v1/chat/completions: NPC lookup, prompt building, vLLM generation, OpenAI responses."""

from __future__ import annotations

import asyncio
from array import array
from collections import OrderedDict
import json
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pruning.export import CorruptCheckpoint, verify_checkpoint
from pruning.model_io import checkpoint_sha256
from service import metrics
from service.engines import EnginePool, NpcWeights, shape_key
from service.errors import ApiError
from service.personas import system_prompt
from service.protocol import ChatCompletionRequest
from service.store import NpcStore

DEFAULT_TEMPERATURE = 0.7


def _stat_key(ckpt: str) -> tuple:
    d = Path(ckpt)
    if not d.is_dir():
        return (ckpt, None)
    return (ckpt, tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir())))


def _has_compact_form(manifest: dict) -> bool:
    """The compact form rebuilds the weights only when nothing but the channel choice changed."""
    return bool(manifest.get("kept_indices")) and manifest.get("compact", True) is not False \
        and not manifest.get("dropped_layers")


@lru_cache(maxsize=1024)
def _verified(stat_key: tuple, mixed: bool = False) -> tuple[dict, dict, tuple | None]:
    """Hash-check a checkpoint once per on-disk state (names, sizes, mtimes).

    A mixed engine builds a compact NPC from the base and its kept indices, so that NPC's own
    weight files are never read: they are not hashed either (~0.4 s per 220 MB)."""
    ckpt = Path(stat_key[0])

    def skip(m: dict) -> tuple[str, ...]:
        return (".safetensors",) if mixed and _has_compact_form(m) and _base_for(m) else ()

    manifest = verify_checkpoint(ckpt, skip)
    compact = None
    if _has_compact_form(manifest):
        scales = manifest.get("channel_scales")
        compact = (tuple(array("i", k) for k in manifest["kept_indices"]),
                   None if scales is None else tuple(array("f", x) for x in scales))
    manifest.pop("kept_indices", None)
    manifest.pop("channel_scales", None)
    config = json.loads((ckpt / "config.json").read_text())
    return manifest, config, compact


def _npc_files(ckpt: str, mixed: bool = False) -> tuple[dict, dict, tuple | None]:
    return _verified(_stat_key(ckpt), mixed)


@lru_cache(maxsize=16)
def _base_matches(base_dir: str, sha: str, stat: tuple) -> bool:
    return checkpoint_sha256(Path(base_dir)) == sha


def _base_for(manifest: dict) -> str | None:
    """The base checkpoint the compact form refers to, if it is here and is the same bytes."""
    base = manifest.get("base_model")
    if not base or not manifest.get("base_sha256") or not Path(base).is_dir():
        return None
    files = sorted(Path(base).glob("*.safetensors"))
    stat = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return base if files and _base_matches(base, manifest["base_sha256"], stat) else None


def npc_weights(npc_id: str, ckpt: Path, manifest: dict, config: dict, compact) -> NpcWeights:
    base = _base_for(manifest) if compact else None
    return NpcWeights(npc_id=npc_id, ckpt=Path(ckpt), key=shape_key(manifest, config),
                      base_label=manifest.get("base_sha256", "")[:12], base_dir=base,
                      kept=compact[0] if base else None, scales=compact[1] if base else None)


_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")
_TOKENIZERS: OrderedDict = OrderedDict()


def _tokenizer(ckpt: str, manifest: dict):
    """NPCs of one base share a tokenizer: cached by the digests of its files, not per NPC (loading
    one takes ~0.3 s, and hundreds of NPCs would thrash a per-path cache)."""
    from transformers import AutoTokenizer

    files = manifest.get("files") or {}
    key = tuple(sorted((n, d) for n, d in files.items() if n.startswith(_TOKENIZER_FILES))) or (ckpt,)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _TOKENIZERS[key] = AutoTokenizer.from_pretrained(ckpt)
        while len(_TOKENIZERS) > 16:
            _TOKENIZERS.popitem(last=False)
    _TOKENIZERS.move_to_end(key)
    return tok


@dataclass
class Prepared:
    rec: dict
    manifest: dict
    w: NpcWeights
    tok: object
    prompts: list[list[int]]
    params: object
    keep_alive: float | None
    echo: bool = False


class ChatServing:
    def __init__(self, store: NpcStore, pool: EnginePool, settings, ckpts=None):
        self.store, self.pool, self.settings, self.ckpts = store, pool, settings, ckpts
        self._pins_loaded: set[str] = set()

    async def resolve(self, model: str, who=None, rec: dict | None = None) -> tuple[dict, Path, dict, dict, NpcWeights]:
        rec = rec if rec is not None else await self.store.get(model)
        if rec is None or (who is not None and not who.owns(rec)):
            raise ApiError(404, f"The model '{model}' does not exist: no NPC has this id",
                           param="model", code="model_not_found")
        if rec.get("keep_alive") is not None:  # the NPC's own residency, also after a restart
            self.pool.keep_alive.setdefault(rec["id"], rec["keep_alive"])
        if rec["status"] != "ready":
            raise ApiError(409, f"NPC '{model}' is not ready (status: {rec['status']}); "
                           "wait until GET /v1/npcs/{id} says ready", param="model", code="npc_not_ready")
        try:
            ckpt = await asyncio.to_thread(self.ckpts.fetch, rec["checkpoint"])
            manifest, config, compact = await asyncio.to_thread(_npc_files, str(ckpt), self.settings.mixed_batches)
            w = await asyncio.to_thread(npc_weights, model, ckpt, manifest, config, compact)
        except (CorruptCheckpoint, OSError, ValueError) as e:
            reason = str(e)
            # never serve it again: the NPC is failed until it is recreated
            await self.store.update(model, status="failed", stage="failed", error=reason)
            raise ApiError(409, f"NPC '{model}' cannot be served: {reason}", param="model",
                           code="checkpoint_corrupt")
        except Exception as e:  # the store is unreachable: not the NPC's fault, try again later
            raise ApiError(503, f"checkpoint store unavailable: {type(e).__name__}: {e}",
                           code="store_unavailable", headers={"Retry-After": "5"})
        return rec, ckpt, manifest, config, w

    def build_prompt(self, rec: dict, req: ChatCompletionRequest, tok) -> list[int]:
        sys_text = system_prompt(rec["name"], rec["persona"], rec.get("card_system_prompt"))
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
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

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

    async def prepare(self, req, who=None) -> Prepared:
        rec = await self.store.get(req.model)
        if rec is not None and who is not None and not who.owns(rec):
            rec = None
        try:
            rec, ckpt, manifest, config, w = await self.resolve(req.model, who, rec)
            tok = _tokenizer(str(ckpt), manifest)
            prompts = self.build_prompts(rec, req, tok)
            params = self.sampling_params(req, max(len(p) for p in prompts), req.stream)
        except ApiError:
            if rec is not None:  # unknown ids get no label: they would be unbounded
                metrics.REQUESTS.labels(npc=metrics.npc_label(req.model), status="rejected").inc()
            raise
        await self._remember_keep_alive(rec, req.keep_alive)
        return Prepared(rec, manifest, w, tok, prompts, params, req.keep_alive)

    async def _remember_keep_alive(self, rec: dict, keep_alive: float | None) -> None:
        """The latest keep_alive given for an NPC is its residency until another is given, across restarts."""
        if keep_alive is not None and rec.get("keep_alive") != keep_alive:
            await self.store.update(rec["id"], keep_alive=keep_alive)

    def build_prompts(self, rec: dict, req, tok) -> list[list[int]]:
        return [self.build_prompt(rec, req, tok)]

    async def load(self, npc_id: str, who=None, keep_alive: float | None = None) -> dict:
        """Put this NPC's weights into an engine now, so its next chat does not wait for it."""
        rec, _, _, _, w = await self.resolve(npc_id, who)
        await self._remember_keep_alive(rec, keep_alive)
        t0 = time.time()
        async with self.pool.serving(w, keep_alive):
            pass
        return {"id": npc_id, "object": "npc.load", "loaded": True, "seconds": round(time.time() - t0, 3),
                "keep_alive": self.pool.keep_alive_of(npc_id)}

    async def prewarm(self, rec: dict) -> None:
        try:
            _, _, _, _, w = await self.resolve(rec["id"])
        except ApiError:
            return
        self.pool.prewarm(w)
        if rec.get("keep_alive") == -1 and rec["id"] not in self._pins_loaded:
            # a pinned NPC is loaded as soon as it is ready (and again after a restart)
            self._pins_loaded.add(rec["id"])
            task = asyncio.ensure_future(self.load(rec["id"]))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- response helpers -----------------------------------------------------

    @staticmethod
    def _logprobs(out, tok, n_top: int) -> dict | None:
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

    @staticmethod
    def _finish(reason: str | None) -> str | None:
        if reason is None:
            return None
        return "length" if reason == "length" else "stop"

    # -- generation (shared with /v1/completions) -------------------------------

    async def generate_final(self, p: Prepared, rid: str) -> list:
        """Every prompt's final output, generated together in one lease of the NPC's slot."""
        label = metrics.npc_label(p.w.npc_id)

        async def one(i: int, prompt: list[int]):
            final = None
            async for out in engine.generate({"prompt_token_ids": prompt}, p.params, f"{rid}-{i}"):
                final = out
            return final

        try:
            async with self.pool.serving(p.w, p.keep_alive) as (engine, _):
                metrics.REQUESTS_RUNNING.labels(npc=label).inc()
                try:
                    return await asyncio.gather(*(one(i, pr) for i, pr in enumerate(p.prompts)))
                finally:
                    metrics.REQUESTS_RUNNING.labels(npc=label).dec()
        except ApiError:
            metrics.REQUESTS.labels(npc=label, status="rejected").inc()
            raise
        except asyncio.CancelledError:  # the client went away: the engine aborts the requests
            metrics.REQUESTS.labels(npc=label, status="cancelled").inc()
            raise
        except Exception as e:
            metrics.REQUESTS.labels(npc=label, status="error").inc()
            raise ApiError(503, f"generation failed: {type(e).__name__}: {e}", code="engine_error") from e

    async def generate_stream(self, p: Prepared, rid: str):
        """Reserve the slot now (errors become HTTP statuses); returns (iterator of (i, out), release)."""
        label = metrics.npc_label(p.w.npc_id)
        lease = self.pool.serving(p.w, p.keep_alive)
        try:
            engine, _ = await lease.__aenter__()
        except ApiError:
            metrics.REQUESTS.labels(npc=label, status="rejected").inc()
            raise
        released = False

        async def release() -> None:
            # called by the stream's end and by the response's background task: whichever runs first
            nonlocal released
            if not released:
                released = True
                await lease.__aexit__(None, None, None)

        async def outputs():
            if len(p.prompts) == 1:
                async for out in engine.generate({"prompt_token_ids": p.prompts[0]}, p.params, rid):
                    yield 0, out
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, prompt: list[int]):
                try:
                    async for out in engine.generate({"prompt_token_ids": prompt}, p.params, f"{rid}-{i}"):
                        await queue.put((i, out))
                finally:
                    await queue.put((i, None))

            tasks = [asyncio.ensure_future(pump(i, pr)) for i, pr in enumerate(p.prompts)]
            try:
                live = len(tasks)
                while live:
                    i, out = await queue.get()
                    if out is None:
                        live -= 1
                    else:
                        yield i, out
                for t in tasks:
                    t.result()  # re-raise an engine error
            finally:
                for t in tasks:
                    t.cancel()

        return outputs(), release

    async def complete(self, req: ChatCompletionRequest, who=None) -> dict:
        p = await self.prepare(req, who)
        npc, label = req.model, metrics.npc_label(req.model)
        t0 = time.time()
        rid = "chatcmpl-" + secrets.token_hex(12)
        (final,) = await self.generate_final(p, rid)
        elapsed = time.time() - t0
        prompt = p.prompts[0]
        choices, n_completion = [], 0
        for o in sorted(final.outputs, key=lambda o: o.index):
            n_completion += len(o.token_ids)
            choices.append({
                "index": o.index,
                "message": {"role": "assistant", "content": o.text, "refusal": None},
                "finish_reason": self._finish(o.finish_reason) or "stop",
                "logprobs": self._logprobs(o, p.tok, req.top_logprobs or 0) if req.logprobs else None,
            })
        metrics.REQUESTS.labels(npc=label, status="ok").inc()
        metrics.PROMPT_TOKENS.labels(npc=label).inc(len(prompt))
        metrics.COMPLETION_TOKENS.labels(npc=label).inc(n_completion)
        metrics.E2E.labels(npc=label).observe(elapsed)
        metrics.TTFT.labels(npc=label).observe(elapsed)  # not streamed: the first token arrives with the rest
        return {
            "id": rid, "object": "chat.completion", "created": int(t0), "model": npc,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_completion,
                      "total_tokens": len(prompt) + n_completion},
            "system_fingerprint": "fp_" + p.manifest.get("base_sha256", "")[:10],
        }

    async def stream(self, req: ChatCompletionRequest, who=None):
        """Validate and reserve first (errors become HTTP statuses), then return the event iterator."""
        p = await self.prepare(req, who)
        npc, label = req.model, metrics.npc_label(req.model)
        rid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt = p.prompts[0]
        outputs, release = await self.generate_stream(p, rid)

        def chunk(choices: list, usage: dict | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": npc,
                    "system_fingerprint": "fp_" + p.manifest.get("base_sha256", "")[:10], "choices": choices}
            if include_usage:
                body["usage"] = usage
            return json.dumps(body)

        async def events():
            t0 = time.time()
            last = None
            n_completion = 0
            status = "error"
            metrics.REQUESTS_RUNNING.labels(npc=label).inc()
            try:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None, "logprobs": None} for i in range(req.n)])
                async for _, out in outputs:
                    now = time.time()
                    if last is None:
                        metrics.TTFT.labels(npc=label).observe(now - t0)
                    else:
                        metrics.ITL.labels(npc=label).observe(now - last)
                    last = now
                    choices = []
                    for o in out.outputs:
                        n_completion += len(o.token_ids)
                        if not o.text and o.finish_reason is None:
                            continue
                        choices.append({"index": o.index, "delta": {"content": o.text} if o.text else {},
                                        "finish_reason": self._finish(o.finish_reason),
                                        "logprobs": self._logprobs(o, p.tok, req.top_logprobs or 0) if req.logprobs else None})
                    if choices:
                        yield chunk(choices)
                if include_usage:
                    yield chunk([], {"prompt_tokens": len(prompt), "completion_tokens": n_completion,
                                     "total_tokens": len(prompt) + n_completion})
                yield "[DONE]"
                status = "ok"
            except asyncio.CancelledError:
                status = "cancelled"
                raise
            except Exception as e:
                err = {"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                 "type": "api_error", "param": None, "code": "engine_error"}}
                yield json.dumps(err)
            finally:
                metrics.REQUESTS_RUNNING.labels(npc=label).dec()
                metrics.REQUESTS.labels(npc=label, status=status).inc()
                metrics.PROMPT_TOKENS.labels(npc=label).inc(len(prompt))
                metrics.COMPLETION_TOKENS.labels(npc=label).inc(n_completion)
                metrics.E2E.labels(npc=label).observe(time.time() - t0)
                await release()

        return events(), release
