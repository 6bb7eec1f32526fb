"""The fault matrix: break a pruning job in each stage, many times, and count what is lost.

    .venv/bin/python -m benchmarks.faults                       # 10 kills per stage -> docs/faults.json
    .venv/bin/python -m benchmarks.faults --kinds kill:learning,disk-full --repeats 2 --no-doc

One rig for the whole run: an embedded Redis (AOF), `npc serve --workers 0`, a directory checkpoint
store that workers publish to, and pruning workers started and killed by the run (`npc worker`,
sharing one data dir; the disk-full worker has its own on a small tmpfs). Each case creates an NPC
with a persona of its own (so the persona-pruner's data is never cached and every stage runs), the
`fast` profile, then breaks its first attempt:

- `kill:STAGE` (loading, filtering, rewriting, learning, exporting, publishing): the first worker
  holds the job when it enters STAGE (NPC_FAULT_HOLD) and is SIGKILLed there; a second worker starts.
- `redis-restart`: Redis is SIGKILLed while the job learns and restarted on its AOF 3 s later.
- `disk-full`: the first worker's data dir is a 24 MiB tmpfs, so its export fails (ENOSPC); once the
  record shows the job queued again, that worker stops and a second one starts.

Counted per case: `lost` (the NPC did not end ready, or its checkpoint does not verify),
`duplicated` (more than one record of it, or more than one copy in the store), `leftover` (an
attempt's dir left on a worker's disk), and the attempts it took.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import ROOT
from service import redis_embedded
from service.devserver import Server, default_models_dir, stop_all

STAGES = ["loading", "filtering", "rewriting", "learning", "exporting", "publishing"]
KINDS = [f"kill:{s}" for s in STAGES] + ["redis-restart", "disk-full"]
PERSONA = ("A retired lighthouse keeper on a windswept island who collects shipwreck stories, distrusts "
           "the mainland, and answers in short, weathered sentences. Keeper number {i} of the coast.")
HOLD_S = 600  # a held job waits this long: the run kills its worker well before


class Rig:
    def __init__(self, tmp: Path, models: Path):
        self.tmp, self.models = tmp, models
        self.redis_dir = tmp / "redis"
        self.redis, self.redis_url = redis_embedded.start(self.redis_dir)
        self.store = tmp / "store"
        self.store.mkdir()
        self.env = {"REDIS_URL": self.redis_url, "NPC_STORE_URL": f"file://{self.store}", "NPC_PREWARM": "false",
                    "NPC_CALIBRATION_PROMPTS": "64", "NPC_JOB_RETRY_S": "2"}
        self.api = Server(tmp / "api", models, self.env, args=["--workers", "0"]).start()
        self.data = tmp / "workers"
        # the persona filter's reference states: computed once per install (`npc models pull`)
        warm = Path(os.environ.get("NPC_DATA_DIR") or Path.home() / ".local/share/npc") / "cache"
        if warm.is_dir():
            shutil.copytree(warm, self.data / "cache")
        self.workers: list[subprocess.Popen] = []

    def worker(self, data: Path | None = None, **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "ab")
        w = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT,
                             env={**os.environ, **self.env, "NPC_DATA_DIR": str(data or self.data),
                                  "NPC_MODELS_DIR": str(self.models), **env})
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        stop_all(self.workers)
        self.workers.clear()

    def get(self, npc_id: str) -> dict:
        return httpx.get(f"{self.api.url}/v1/npcs/{npc_id}", timeout=10).json()

    def wait(self, npc_id: str, pred, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        while True:
            try:
                rec = self.get(npc_id)
                if pred(rec):
                    return rec
                if rec["status"] == "failed":
                    raise TimeoutError(f"{npc_id}: failed before {what}: {rec.get('error')}")
            except httpx.HTTPError:  # the API's Redis is restarting
                rec = None
            if time.time() > deadline:
                raise TimeoutError(f"{npc_id}: {what} not seen in {timeout:.0f} s; last {rec}")
            time.sleep(0.2)

    def restart_redis(self, down_s: float = 3.0) -> None:
        port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        time.sleep(2)  # past the AOF's once-a-second fsync of the stage the case waited for
        self.redis.kill()
        self.redis.wait()
        time.sleep(down_s)
        self.redis, _ = redis_embedded.start(self.redis_dir, port=port)

    def close(self) -> None:
        self.stop_workers()
        self.api.stop()
        redis_embedded.stop(self.redis)


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def run_case(rig: Rig, kind: str, i: int, timeout: float = 600) -> dict:
    t0 = time.time()
    full = None
    if kind.startswith("kill:"):
        first = rig.worker(NPC_FAULT_HOLD=f"{kind[5:]}:{HOLD_S}")
    elif kind == "disk-full":
        full = rig.tmp / f"full-{i}"
        _tmpfs(full, "24m")
        shutil.copytree(rig.data / "cache", full / "cache", dirs_exist_ok=True)
        first = rig.worker(full, NPC_JOB_RETRY_S="10")  # stopped before it could take the job again
    else:
        first = rig.worker(NPC_FAULT_HOLD="learning:4")  # Redis goes away 2 s in, for 3 s: the job wakes without it
    r = httpx.post(f"{rig.api.url}/v1/npcs", timeout=30, json={
        "name": f"Keeper {kind.replace(':', ' ')} {i}", "persona": PERSONA.format(i=f"{kind}-{i}"), "sparsity": 0.25,
        "method": "persona-pruner", "options": {"profile": "fast"}})
    if r.status_code != 202:
        raise RuntimeError(f"create refused: {r.status_code} {r.text}")
    npc = r.json()["id"]
    try:
        if kind.startswith("kill:"):
            rig.wait(npc, lambda r: r["stage"] == kind[5:], timeout, f"stage {kind[5:]}")
            first.send_signal(signal.SIGKILL)
            first.wait()
            rig.worker()
        elif kind == "disk-full":
            rig.wait(npc, lambda r: r["status"] == "queued" and "space" in (r.get("error") or ""), timeout,
                     "the job queued again after ENOSPC")
            rig.stop_workers()
            rig.worker()
        else:
            rig.wait(npc, lambda r: r["stage"] == "learning", timeout, "stage learning")
            rig.restart_redis()
            if first.poll() is not None:  # a worker that lost Redis for good is restarted, as k8s would
                rig.worker()
        rec = rig.wait(npc, lambda r: r["status"] in ("ready", "failed"), timeout, "the end of the job")
    except TimeoutError as e:
        rec = {"status": "timeout", "error": str(e)}
    finally:
        rig.stop_workers()
        if full is not None:
            subprocess.run(["umount", str(full)], check=False)
    return {"kind": kind, "i": i, "npc": npc, "seconds": round(time.time() - t0, 1), **check(rig, npc, rec)}


def check(rig: Rig, npc: str, rec: dict) -> dict:
    from pruning import PruneError
    from pruning.manifest import Manifest

    named = [n for n in httpx.get(f"{rig.api.url}/v1/npcs?limit=1000", timeout=10).json()["data"] if n["id"] == npc]
    copies = [p for p in rig.store.iterdir() if p.name.startswith(npc)]
    verified = False
    if rec["status"] == "ready" and len(copies) == 1:
        try:
            Manifest.verify(copies[0])
            verified = True
        except (PruneError, OSError, ValueError):
            pass
    leftover = [p.name for p in (rig.data / "npcs").glob(f".{npc}*")] if (rig.data / "npcs").is_dir() else []
    return {"status": rec["status"], "attempts": rec.get("attempts"), "error": rec.get("error"),
            "lost": int(rec["status"] != "ready" or not verified), "duplicated": int(len(named) > 1 or len(copies) > 1),
            "leftover": len(leftover)}


def summarise(cases: list[dict]) -> dict:
    out = {}
    for kind in dict.fromkeys(c["kind"] for c in cases):
        cs = [c for c in cases if c["kind"] == kind]
        out[kind] = {"cases": len(cs), "lost": sum(c["lost"] for c in cs), "duplicated": sum(c["duplicated"] for c in cs),
                     "leftover": sum(c["leftover"] for c in cs),
                     "attempts": sorted({c["attempts"] for c in cs if c["attempts"] is not None}),
                     "seconds_mean": round(sum(c["seconds"] for c in cs) / len(cs), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--repeats", type=int, default=10, help="cases of each kill")
    ap.add_argument("--other-repeats", type=int, default=3, help="cases of redis-restart and of disk-full")
    ap.add_argument("--start", type=int, default=0, help="first case number (to go on from an earlier run; "
                    "--merge its JSON lines)")
    ap.add_argument("--merge", type=Path, action="append", default=[],
                    help="a log of an earlier run: its case lines join this run's in the summary")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "faults.json")
    ap.add_argument("--no-doc", dest="doc", action="store_false", help="print only")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    cases: list[dict] = [json.loads(line) for p in args.merge for line in p.read_text().splitlines()
                         if line.startswith('{"kind"')]
    with tempfile.TemporaryDirectory(prefix="npc-faults-") as tmp:
        rig = Rig(Path(tmp), default_models_dir())
        try:
            for i in range(args.start, args.repeats):
                for kind in kinds:
                    if not kind.startswith("kill:") and i >= args.other_repeats:
                        continue
                    cases.append(run_case(rig, kind, i))
                    print(json.dumps(cases[-1]), flush=True)
        finally:
            rig.close()
    result = {"summary": summarise(cases), "cases": cases}
    print(json.dumps(result["summary"], indent=1))
    if args.doc:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
