"""What chat and text completions share: the NPC's record and checkpoint, the engine lease,
generation, and the pieces of an OpenAI response."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from pruning.manifest import CorruptCheckpoint
from pruning.model_io import resolve_base
from service import metrics
from service.engines.pool import EnginePool
from service.engines.slot import NpcWeights, shape_key
from service.errors import ApiError, limit_error
from service.npcs.checkpoints import CheckpointStore, OpenedCheckpoint, open_base
from service.npcs.records import LimitReached, NpcStore, serving_of

DEFAULT_TEMPERATURE = 0.7
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")
_TOKENIZERS: OrderedDict = OrderedDict()


def tokenizer_of(ck: OpenedCheckpoint):
    """NPCs of one base share a tokenizer: cached by the digests of its files, not per NPC (loading
    one takes ~0.3 s, and hundreds of NPCs would thrash a per-path cache)."""
    from transformers import AutoTokenizer

    files = ck.manifest.files or {}
    key = tuple(sorted((n, d) for n, d in files.items() if n.startswith(_TOKENIZER_FILES))) or (str(ck.path),)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(ck.path))
        while len(_TOKENIZERS) > 16:
            _TOKENIZERS.popitem(last=False)
    _TOKENIZERS.move_to_end(key)
    return tok


def npc_weights(npc_id: str, ck: OpenedCheckpoint) -> NpcWeights:
    sha = ck.manifest.base_sha256 or ""
    return NpcWeights(npc_id=npc_id, ckpt=ck.path, key=shape_key(sha, ck.config), base_label=sha[:12],
                      base_dir=ck.base_dir if ck.kept is not None else None, kept=ck.kept, scales=ck.scales)


@dataclass
class Prepared:
    fingerprint: str
    w: NpcWeights
    tok: object
    prompts: list[list[int]]
    params: object
    keep_alive: float | None
    echo: bool = False


def finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def stream_error(e: Exception) -> str:
    return json.dumps({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                 "type": "api_error", "param": None, "code": "engine_error"}})


class Serving:
    """One endpoint's serving class: `build_prompts` and `sampling_params` are the endpoint's own."""

    def __init__(self, store: NpcStore, pool: EnginePool, settings, ckpts: CheckpointStore | None = None):
        self.store, self.pool, self.settings, self.ckpts = store, pool, settings, ckpts
        self._pins_loaded: set[str] = set()
        self._loading: dict[str, asyncio.Future] = {}

    def build_prompts(self, rec: dict, req, tok) -> list[list[int]]:
        raise NotImplementedError

    def sampling_params(self, req, prompt_len: int, stream: bool):
        raise NotImplementedError

    async def resolve(self, model: str, who=None) -> tuple[dict, OpenedCheckpoint, NpcWeights]:
        """The caller's servable NPC `model`, its verified checkpoint (the dense base while it is
        served by its prompt) and how to load it."""
        rec = await self.store.get(model)
        if rec is None or (who is not None and not who.owns(rec)):
            raise ApiError(404, f"The model '{model}' does not exist: no NPC has this id",
                           param="model", code="model_not_found")
        if rec.get("keep_alive") is not None:  # the NPC's own residency, also after a restart
            self.pool.residency.remember(rec["id"], rec["keep_alive"])
        mode = serving_of(rec, self.settings.instant_npcs)
        if mode is None:
            raise ApiError(409, f"NPC '{model}' is not ready (status: {rec['status']}); "
                           "wait until GET /v1/npcs/{id} says ready", param="model", code="npc_not_ready")
        if mode == "prompt":
            ck = await self._open_base(model, rec["base"])
        else:
            ck = await self._open_checkpoint(model, rec["checkpoint"])
        rec["serving"] = mode
        rec["card"] = await self.store.card(rec)
        return rec, ck, npc_weights(model, ck)

    async def _open_base(self, model: str, base: str) -> OpenedCheckpoint:
        """The dense base a prompt-served NPC runs on. It is the server's, not the NPC's: whatever
        fails here is a 503 and nothing is marked failed."""
        try:
            return await asyncio.to_thread(open_base, str(resolve_base(base, self.settings.models)))
        except Exception as e:
            raise ApiError(503, f"the base model of NPC '{model}' cannot be opened here ({type(e).__name__})",
                           code="base_model_missing", headers={"Retry-After": "30"}) from None

    async def _open_checkpoint(self, model: str, ref: str) -> OpenedCheckpoint:
        try:
            return await asyncio.to_thread(self.ckpts.open, ref, self.settings.mixed_batches)
        except OSError as e:  # a full disk, EMFILE, a store's 403: not the checkpoint's fault, retry
            raise ApiError(503, f"NPC '{model}' cannot be opened now ({type(e).__name__}: "
                           f"{e.strerror or 'I/O error'}); retry shortly",
                           code="checkpoint_unavailable", headers={"Retry-After": "5"}) from None
        except (CorruptCheckpoint, ValueError) as e:
            # only bytes that fail their hash (or a missing file): never served again until recreated
            await self.store.update(model, status="failed", stage="failed", error=str(e))
            raise ApiError(409, f"NPC '{model}' cannot be served: {e}", param="model",
                           code="checkpoint_corrupt") from None
        except Exception as e:  # the store is unreachable: not the NPC's fault, try again later
            raise ApiError(503, f"checkpoint store unavailable: {type(e).__name__}: {e}",
                           code="store_unavailable", headers={"Retry-After": "5"}) from e

    async def prepare(self, req, who=None, meta: dict | None = None) -> Prepared:
        """Everything a generation needs; `meta` gets what the response headers say ("serving")."""
        known = False
        try:
            rec, ck, w = await self.resolve(req.model, who)
            known = True
            tok = tokenizer_of(ck)
            prompts = self.build_prompts(rec, req, tok)
            params = self.sampling_params(req, max(len(p) for p in prompts), req.stream)
        except ApiError as e:
            if known or e.code in ("npc_not_ready", "checkpoint_corrupt", "checkpoint_unavailable", "store_unavailable",
                                   "base_model_missing"):
                # unknown ids get no label: they would be unbounded
                metrics.REQUESTS.labels(npc=metrics.npc_label(req.model), status="rejected").inc()
            raise
        await self._remember_keep_alive(rec, req.keep_alive, who)
        fingerprint = "fp_" + (ck.manifest.base_sha256 or "")[:10]
        if meta is not None:
            meta["serving"] = rec["serving"]
        return Prepared(fingerprint, w, tok, prompts, params, req.keep_alive)

    async def _remember_keep_alive(self, rec: dict, keep_alive: float | None, who=None) -> None:
        """The latest keep_alive given for an NPC is its residency until another is given, across
        restarts. A pin (-1) is counted first: past a cap it is a 429 and nothing changes."""
        if keep_alive is None or rec.get("keep_alive") == keep_alive:
            return
        if keep_alive == -1:
            try:
                await self.store.pin(rec["id"], rec.get("owner") or "public",
                                     None if who is None or who.admin else self.settings.tenant_max_pins,
                                     self.settings.max_pins)
            except LimitReached as e:
                raise limit_error(e, "keep_alive") from None
        await self.store.update(rec["id"], keep_alive=keep_alive)
        if rec.get("keep_alive") == -1:
            await self.store.unpin(rec["id"])

    async def load(self, npc_id: str, who=None, keep_alive: float | None = None,
                   wait_s: float | None = None) -> dict:
        """Put this NPC's weights into an engine now, so its next chat does not wait for it. Waits at
        most `wait_s`; then `loaded` is false and the load goes on (one per NPC, however often asked)."""
        rec, _, w = await self.resolve(npc_id, who)
        await self._remember_keep_alive(rec, keep_alive, who)
        t0 = time.time()
        task = self._loading.get(npc_id)
        if task is None or task.done():
            task = self._loading[npc_id] = asyncio.ensure_future(self._load(w, keep_alive))
            task.add_done_callback(lambda t: self._loaded(npc_id, t))
        wait = self.settings.load_wait_s if wait_s is None else wait_s
        done, _ = await asyncio.wait({task}, timeout=wait)
        if task in done:
            task.result()  # an ApiError of the load is the answer
        return {"id": npc_id, "object": "npc.load", "loaded": task in done, "seconds": round(time.time() - t0, 3),
                "keep_alive": self.pool.residency.of(npc_id)}

    def _loaded(self, npc_id: str, task: asyncio.Future) -> None:
        if self._loading.get(npc_id) is task:
            del self._loading[npc_id]
        if not task.cancelled():
            task.exception()  # retrieved: a load nobody waits for any more fails quietly

    async def _load(self, w: NpcWeights, keep_alive: float | None) -> None:
        async with self.pool.serving(w, keep_alive):
            pass

    async def prewarm(self, rec: dict) -> bool:
        """Start engines for this ready NPC's shape (and load it if pinned); True when nothing more
        is to be done for it."""
        try:
            _, _, w = await self.resolve(rec["id"])
        except ApiError:
            return True
        settled = self.pool.prewarm(w)
        if rec.get("keep_alive") == -1 and rec["id"] not in self._pins_loaded:
            # a pinned NPC is loaded as soon as it is ready (and again after a restart)
            self._pins_loaded.add(rec["id"])
            task = asyncio.ensure_future(self.load(rec["id"]))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return settled

    # -- generation ---------------------------------------------------------------

    async def generate_final(self, p: Prepared, rid: str) -> list:
        """Every prompt's final output, generated together in one lease of the NPC's slot."""
        label = metrics.npc_label(p.w.npc_id)

        async def one(i: int, prompt: list[int]):
            final = None
            async for out in engine.generate({"prompt_token_ids": prompt}, p.params, f"{rid}-{i}"):
                final = out
            return final

        try:
            async with self.pool.serving(p.w, p.keep_alive) as engine:
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
        except ValueError as e:  # vLLM's own check of the request (a grammar it cannot build, say)
            metrics.REQUESTS.labels(npc=label, status="rejected").inc()
            raise ApiError(400, f"the engine refused this request: {e}", code="invalid_value") from e
        except Exception as e:
            metrics.REQUESTS.labels(npc=label, status="error").inc()
            raise ApiError(503, f"generation failed: {type(e).__name__}: {e}", code="engine_error") from e

    async def generate_stream(self, p: Prepared, rid: str):
        """Reserve the slot now (errors become HTTP statuses); returns (iterator of (i, out), release)."""
        label = metrics.npc_label(p.w.npc_id)
        lease = self.pool.serving(p.w, p.keep_alive)
        try:
            engine = await lease.__aenter__()
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

    async def sse(self, label: str, n_prompt: int, release, body):
        """A stream's data lines: `body(t0, counted)`'s chunks, then [DONE]; however the stream ends
        (done, client gone, engine error), its metrics are counted and its engine lease released.
        `body` adds the completion tokens it streams to counted[0]."""
        t0 = time.time()
        counted, status = [0], "error"
        metrics.REQUESTS_RUNNING.labels(npc=label).inc()
        try:
            async for data in body(t0, counted):
                yield data
            yield "[DONE]"
            status = "ok"
        except asyncio.CancelledError:  # the client went away: closing the outputs aborts in vLLM
            status = "cancelled"
            raise
        except Exception as e:
            yield stream_error(e)
        finally:
            metrics.REQUESTS_RUNNING.labels(npc=label).dec()
            self.count_done(label, status, n_prompt, counted[0], time.time() - t0)
            await release()

    @staticmethod
    def count_done(label: str, status: str, n_prompt: int, n_completion: int, seconds: float) -> None:
        metrics.REQUESTS.labels(npc=label, status=status).inc()
        metrics.PROMPT_TOKENS.labels(npc=label).inc(n_prompt)
        metrics.COMPLETION_TOKENS.labels(npc=label).inc(n_completion)
        metrics.E2E.labels(npc=label).observe(seconds)
