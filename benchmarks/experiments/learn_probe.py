"""Initialisation mixes and optimiser settings from one dense pass over a cached synthetic set.

    .venv/bin/python -m benchmarks.experiments.learn_probe PERSONAS VARIANTS_JSON TAG [DATA_OPTIONS_JSON]
    .venv/bin/python -m benchmarks.experiments.learn_probe 0,3 '[{"w": 0.5, "snap": [0, 16]}, {"w": 0.5, "cfg": {"lr": 0.02}, "snap": [32]}]' lr

Needs the default profile's synthetic set of each persona in the benchmark cache (run quality.py
or scale_probe.py first); with DATA_OPTIONS_JSON (persona-pruner options, e.g. '{"max_new_tokens": 96}')
that set is built or reused instead. `w` is the Fisher weight of the act-fisher init; `"train_kl": true` also
scores each snapshot's hard mask on the whole training set; with `"cfg": {"scale_steps": N}` the
mask is fixed after `steps` and the snapshots from then on are the scaled masks. Prints PROBE json lines;
results are in docs/quality_experiments.md.
"""
import sys, time, json
import torch
from benchmarks.experiments.probe_common import persona_runs, score_kl, score_masks
from pruning.methods.persona_pruner.masklearn import MaskTrainer, initial_scores, _normalise
from pruning.methods.persona_pruner.targets import dense_pass, fisher_diag, masked_losses
from pruning.model_io import frozen
from pruning.options import config_for
from pruning.prefix_forward import shared_prompt_len

if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]
    variants = json.loads(sys.argv[2])   # [{"w":0.5,"cfg":{...},"snap":[0,16]}]
    tag = sys.argv[3]
    data_opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    snaps = []
    for p in persona_runs(us, data_opts):
        assert data_opts or p.info["dataset_cached"], p.info
        print("DATA", p.u, len(p.examples), p.data_s, flush=True)
        work, tok, k, ex = p.work, p.tok, p.k, p.examples
        t = time.time()
        with frozen(work):
            P = shared_prompt_len(ex)
            dense, acts = dense_pass(work, tok, ex, P, 8, 64)
            fisher = fisher_diag(work, tok, ex, P, 8, dense=dense)
            a = initial_scores(work, acts, "activation", 0)
            f = torch.stack([_normalise(x) for x in fisher])
            print("INIT", round(time.time() - t), flush=True)
            for v in variants:
                w = v.get("w", 0.5)
                init = (1 - w) * a + w * f
                cfg = config_for("default", **v.get("cfg", {}), seed=0)
                tr = MaskTrainer(work, tok, ex, k, cfg, init_scores=list(init), dense=dense)
                t1 = time.time()
                for st in range(max(v["snap"]) + 1):
                    if cfg.scale_steps and st == cfg.steps:
                        tr.fix_mask()
                    if st in v["snap"]:
                        # KL on the whole training set under this hard mask: what the mask can fit
                        eff = tr.sc.effective()
                        tk = (masked_losses(work, tok, ex, list(eff), P, dense=dense)["kl"]
                              if v.get("train_kl") else None)
                        snaps.append((p, v, st, eff.clone() if tr.sc.scale is not None else tr.scores.detach().clone(),
                                      round(time.time() - t1), tk))
                    if st < max(v["snap"]):
                        tr.step()
    for p, v, st, sc, sec, tk in snaps:
        # in the scale phase the snapshot is the effective (scaled) mask itself
        kl = (score_masks(p.evp, p.evg, list(sc)) if (sc == 0).sum() > 0
              else score_kl(p.model, p.evp, p.evg, list(sc), p.k))
        print("PROBE", json.dumps({"tag": tag, "persona": p.u, "v": v, "step": st,
              **kl, "sec": sec,
              "train_kl": None if tk is None else round(tk, 4)}), flush=True)
