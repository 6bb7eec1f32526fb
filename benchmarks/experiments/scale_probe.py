"""Persona KL against the amount of synthetic data and the number of learning steps.

    .venv/bin/python -m benchmarks.experiments.scale_probe PERSONAS DATA_OPTIONS_JSON RUNS_JSON TAG
    .venv/bin/python -m benchmarks.experiments.scale_probe 0,3 '{"n_instructions": 256, "teacher_backend": "vllm"}' \
        '[{"n": 64, "snap": [0, 16]}, {"n": 256, "snap": [0, 16, 32, 64], "cfg": {"prefix_grad": true}}]' scale

Builds (or reuses) each persona's synthetic set with DATA_OPTIONS, then for each run learns on its
top `n` rows and scores snapshots of the same run at the `snap` steps on the eval questions.
Prints one PROBE json line per snapshot; results are in docs/quality_experiments.md.
"""
import sys, time, json
from benchmarks.experiments.probe_common import persona_runs, score_kl
from pruning.methods.persona_pruner.masklearn import MaskTrainer
from pruning.model_io import frozen
from pruning.options import config_for

if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]
    data_opts = json.loads(sys.argv[2])       # options for build_dataset
    runs = json.loads(sys.argv[3])            # [{"n":..,"snap":[0,16],"cfg":{...}}]
    tag = sys.argv[4]
    snaps = []
    for p in persona_runs(us, data_opts):
        print("DATA", p.u, len(p.examples), p.data_s, p.info, flush=True)
        for r in runs:
            cfg = config_for("default", **r.get("cfg", {}), seed=0)
            ex = p.examples[: r["n"]]
            t1 = time.time()
            with frozen(p.work):
                tr = MaskTrainer(p.work, p.tok, ex, p.k, cfg)
                tinit = time.time() - t1
                for st in range(max(r["snap"]) + 1):
                    if st in r["snap"]:
                        snaps.append((p, r, st, tr.scores.detach().clone(), round(time.time() - t1), tinit,
                                      tr.history[-1]["loss"] if tr.history else None))
                    if st < max(r["snap"]):
                        tr.step()
    for p, r, st, sc, sec, tinit, loss in snaps:
        kl = score_kl(p.model, p.evp, p.evg, list(sc), p.k)
        print("PROBE", json.dumps({"tag": tag, "persona": p.u, "n": r["n"], "cfg": r.get("cfg", {}), "step": st,
              **kl,
              "sec": sec, "init_s": round(tinit), "train_loss": loss}), flush=True)
