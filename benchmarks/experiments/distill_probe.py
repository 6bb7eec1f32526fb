"""LoRA distillation after the default mask (an experiment, not a method).

    .venv/bin/python -m benchmarks.experiments.distill_probe PERSONAS RUNS_JSON TAG
    .venv/bin/python -m benchmarks.experiments.distill_probe 0 '[{"lr": 5e-4, "rank": 8, "snap": [16, 32, 64]}]' kl

Learns the default profile's mask and scales on each persona's cached synthetic set, then trains
LoRA adapters (all linear layers) of a copy of the model under that scaled mask on the mask
trainer's own loss: KL to the dense model's top-64 distribution on the synthetic answers
(`"ce": true`: cross-entropy on the answers instead, what `--recover` does). Each snapshot is
merged into a copy and scored on the eval questions. Prints one PROBE json line per snapshot.
"""
import sys, time, json, copy
import torch
from peft import LoraConfig, get_peft_model
from benchmarks.experiments.probe_common import persona_runs, score_masks
from pruning.methods.persona_pruner.masklearn import MaskTrainer
from pruning.model_io import frozen
from pruning.options import config_for
from pruning.recovery import TARGETS


if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]
    runs = json.loads(sys.argv[2])
    tag = sys.argv[3]
    for p in persona_runs(us):
        ex = p.examples
        cfg = config_for("default", seed=0)
        t = time.time()
        with frozen(p.work):
            tr = MaskTrainer(p.work, p.tok, ex, p.k, cfg)
            for st in range(cfg.steps + cfg.scale_steps):
                if st == cfg.steps:
                    tr.fix_mask()
                tr.step()
        eff = [m.detach().float().clone() for m in tr.sc.effective()]
        print("PROBE", json.dumps({"tag": tag, "persona": p.u, "variant": "mask+scales", **score_masks(p.evp, p.evg, eff, copy.deepcopy(p.work).float()),
                                   "learn_s": round(time.time() - t)}), flush=True)
        for r in runs:
            student = copy.deepcopy(p.work)
            peft = get_peft_model(student, LoraConfig(r=r.get("rank", 8), lora_alpha=2 * r.get("rank", 8),
                                                      lora_dropout=0.0, target_modules=TARGETS, bias="none"))
            params = [q for q in peft.parameters() if q.requires_grad]
            for q in params:  # fp32 adapters on the bf16 copy: small updates vanish in bf16
                q.data = q.data.float()
            opt = torch.optim.AdamW(params, lr=r.get("lr", 5e-4), weight_decay=0.0)
            lcfg = config_for("default", seed=0, **({"ce_weight": 1.0, "kl_weight": 0.0} if r.get("ce") else {}))
            st_tr = MaskTrainer(student, p.tok, ex, p.k, lcfg, init_scores=list(tr.init), dense=tr.dense)
            st_tr.sc = tr.sc  # the learned mask and scales, fixed
            tr.sc.scale.requires_grad_(False)
            order = torch.randperm(len(tr.dense.batches), generator=torch.Generator().manual_seed(1)).tolist()
            t1 = time.time()
            for step in range(1, max(r["snap"]) + 1):
                if not order:
                    order = torch.randperm(len(tr.dense.batches), generator=torch.Generator().manual_seed(step)).tolist()
                loss, _, _ = st_tr.loss(order.pop())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if step in r["snap"]:
                    merged = copy.deepcopy(peft).merge_and_unload().float()
                    print("PROBE", json.dumps({"tag": tag, "persona": p.u, "variant": "lora", "run": r, "step": step,
                                               "loss": round(float(loss), 4), **score_masks(p.evp, p.evg, eff, merged),
                                               "train_s": round(time.time() - t1)}), flush=True)
                    del merged
            tr.sc.scale.requires_grad_(True)
            del peft, student
