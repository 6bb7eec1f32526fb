"""Persona KL against the amount of synthetic data and the number of learning steps.

    .venv/bin/python benchmarks/scale_probe.py PERSONAS DATA_OPTIONS_JSON RUNS_JSON TAG
    .venv/bin/python benchmarks/scale_probe.py 0,3 '{"n_instructions": 256, "teacher_backend": "vllm"}' \
        '[{"n": 64, "snap": [0, 16]}, {"n": 256, "snap": [0, 16, 32, 64], "cfg": {"prefix_grad": true}}]' scale

Builds (or reuses) each persona's synthetic set with DATA_OPTIONS, then for each run learns on its
top `n` rows and scores snapshots of the same run at the `snap` steps on the eval questions.
Prints one PROBE json line per snapshot; results are in docs/quality_experiments.md.
"""
import sys, time, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
from probe_common import WORK, evaluators, persona_context, score_kl, setup
from pruning.batching import make_examples
from pruning.export import keep_count

from pruning.persona_pruner import resolve_options, build_dataset, in_precision, compute_dtype, base_identity
from pruning.masklearn import config_for, MaskTrainer, frozen
from pruning import vllm_gen

if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]
    data_opts = json.loads(sys.argv[2])       # options for build_dataset
    runs = json.loads(sys.argv[3])            # [{"n":..,"snap":[0,16],"cfg":{...}}]
    tag = sys.argv[4]
    model, tok, A = setup()
    k = keep_count(model.config.intermediate_size, 0.25)
    bid = base_identity(model)
    for u in us:
        sp, evp, evg = evaluators(model, tok, u, A)
        ctx = persona_context(sp, 0.25, data_opts)
        opts = resolve_options(ctx)
        t = time.time()
        snaps = []
        with in_precision(model, compute_dtype("auto", torch.device("cpu"))) as work:
            rows, info = build_dataset(work, tok, ctx, opts, bid, WORK / "cache")
            vllm_gen.release()
            print("DATA", u, len(rows), round(time.time() - t), info, flush=True)
            for r in runs:
                cfg = config_for("default", **r.get("cfg", {}), seed=0)
                sel = rows[: r["n"]]
                ex = make_examples(tok, ctx.chat_system, [x["instruction"] for x in sel], [x["answer"] for x in sel],
                                   [bool(x.get("finished", True)) for x in sel], max_length=cfg.max_length)
                t1 = time.time()
                with frozen(work):
                    tr = MaskTrainer(work, tok, ex, k, cfg)
                    tinit = time.time() - t1
                    for st in range(max(r["snap"]) + 1):
                        if st in r["snap"]:
                            snaps.append((r, st, tr.scores.detach().clone(), round(time.time() - t1), tinit,
                                          tr.history[-1]["loss"] if tr.history else None))
                        if st < max(r["snap"]):
                            tr.step()
        for r, st, sc, sec, tinit, loss in snaps:
            kl = score_kl(model, evp, evg, list(sc), k)
            print("PROBE", json.dumps({"tag": tag, "persona": u, "n": r["n"], "cfg": r.get("cfg", {}), "step": st,
                  **kl,
                  "sec": sec, "init_s": round(tinit), "train_loss": loss}), flush=True)
