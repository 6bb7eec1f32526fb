"""Time the first-NPC path on a fresh `npc serve`: POST -> ready, engine warm, chat latency.

    .venv/bin/python -m benchmarks.first_npc [--method activation] [--sparsity 0.25]

Starts its own server on a temporary data dir (embedded Redis, one worker, vLLM on CPU),
prints one JSON object of timings, and stops everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from service.devserver import Server, default_models_dir

PERSONA_A = ("A grumpy old pirate captain named Rook who loves rum, hates the navy, "
             "and speaks in salty sea slang about storms, treasure and his ship.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="activation")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--chats", type=int, default=5)
    args = ap.parse_args()
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp), default_models_dir()).start()
        try:
            t0 = time.time()
            rec = srv.create_npc("Captain Rook", PERSONA_A, sparsity=args.sparsity, method=args.method)
            rec = srv.wait_ready(rec["id"], timeout=1800)
            ready = time.time() - t0
            while not httpx.get(srv.url + "/v1/engines").json()["data"]:  # prewarm starts the engine
                time.sleep(0.5)
            first = time.time()
            client = OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=600)
            msgs = [{"role": "user", "content": "Who are you, and what do you love most?"}]
            client.chat.completions.create(model=rec["id"], messages=msgs, max_tokens=64, temperature=0)
            first_chat = time.time() - first
            e2e, ttft, toks = [], [], []
            for _ in range(args.chats):
                t = time.time()
                r = client.chat.completions.create(model=rec["id"], messages=msgs, max_tokens=64, temperature=0)
                e2e.append(time.time() - t)
                toks.append(r.usage.completion_tokens)
                t = time.time()
                for chunk in client.chat.completions.create(model=rec["id"], messages=msgs, max_tokens=64,
                                                            stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        ttft.append(time.time() - t)
                        break
            print(json.dumps({
                "method": args.method, "sparsity": args.sparsity,
                "post_to_ready_s": round(ready, 1), "job_timings": rec["timings"],
                "post_to_first_answer_s": round(first + first_chat - t0, 1),
                "first_chat_after_engine_start_s": round(first_chat, 2),
                "chat_64tok_p50_s": round(statistics.median(e2e), 2),
                "decode_tok_per_s": round(sum(toks) / sum(e2e), 1),
                "ttft_stream_p50_s": round(statistics.median(ttft), 3),
            }, indent=1))
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
