"""After the default mask and scales: a logit temperature, and learned RMSNorm weights.

    .venv/bin/python -m benchmarks.experiments.norm_probe PERSONAS NORM_STEPS_CSV [NORM_LR] [WHICH]

Per persona (default profile's synthetic set, built or cached): the shipped learning (16 mask
steps, 32 scale steps), then
- the evaluation's KL with the final norm's weight divided by T (= logits / T, the head is tied),
- NORM_STEPS more steps on the same KL loss that train only the RMSNorm weights (WHICH: "all",
  "final", "ffn" = post-attention norms, "attn" = input norms), mask and scales fixed; snapshots at
  each count in NORM_STEPS_CSV.
Prints PROBE json lines.
"""
import sys, time, json
import torch
from benchmarks.experiments.probe_common import persona_runs, score_masks
from pruning.methods.persona_pruner.masklearn import MaskTrainer
from pruning.model_io import frozen
from pruning.options import config_for


def norm_params(model, which: str) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            continue
        if which == "all" or (which == "final" and name == "model.norm.weight") \
                or (which == "ffn" and "post_attention_layernorm" in name) \
                or (which == "attn" and "input_layernorm" in name):
            out[name] = p
    return out


if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]
    snaps_at = [int(x) for x in sys.argv[2].split(",")]
    lr = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-3
    which = sys.argv[4] if len(sys.argv) > 4 else "all"
    temps = [0.9, 0.95, 1.0, 1.05, 1.1]
    results = []
    for p in persona_runs(us):
        print("DATA", p.u, len(p.examples), p.data_s, flush=True)
        cfg = config_for("default", seed=0)
        t = time.time()
        with frozen(p.work):
            tr = MaskTrainer(p.work, p.tok, p.examples, p.k, cfg)
            for st in range(cfg.steps + cfg.scale_steps):
                if st == cfg.steps:
                    tr.fix_mask()
                tr.step()
            eff = tr.sc.effective().clone()
            print("LEARNED", p.u, round(time.time() - t), flush=True)
            params = norm_params(p.work, which)
            orig = {n: q.detach().clone() for n, q in params.items()}
            for q in params.values():
                q.requires_grad_(True)
            # fp32 masters: Adam's small steps vanish in a bf16 weight
            master = {n: torch.nn.Parameter(q.detach().float().clone()) for n, q in params.items()}
            opt = torch.optim.Adam(list(master.values()), lr=lr)
            snaps = {0: {n: q.clone() for n, q in orig.items()}}
            t1 = time.time()
            for st in range(1, max(snaps_at) + 1):
                if not tr._order:
                    tr._order = torch.randperm(len(tr.dense.batches), generator=tr.gen).tolist()
                loss, _ce, kl = tr.loss(tr._order.pop())
                opt.zero_grad(set_to_none=True)
                tr.sc.scale.grad = None
                loss.backward()
                for n, q in params.items():
                    master[n].grad = q.grad.float()
                    q.grad = None
                opt.step()
                with torch.no_grad():
                    for n, q in params.items():
                        q.copy_(master[n].to(q.dtype))
                if st in snaps_at:
                    snaps[st] = {n: q.detach().clone() for n, q in master.items()}
                    print("STEP", st, round(float(kl.mean()), 4), round(time.time() - t1), flush=True)
            with torch.no_grad():
                for n, q in params.items():
                    q.copy_(orig[n])
        results.append((p, eff, snaps))
    for p, eff, snaps in results:
        named = dict(p.model.named_parameters())
        final = named["model.norm.weight"]
        base = final.detach().clone()
        for T in temps:
            with torch.no_grad():
                final.copy_(base / T)
            print("PROBE", json.dumps({"persona": p.u, "what": "temperature", "T": T,
                                       **score_masks(p.evp, p.evg, list(eff))}), flush=True)
        with torch.no_grad():
            final.copy_(base)
        for st, w in snaps.items():
            keep = {n: named[n].detach().clone() for n in w}
            with torch.no_grad():
                for n, v in w.items():
                    named[n].copy_(v.to(named[n].dtype))
            print("PROBE", json.dumps({"persona": p.u, "what": f"norm-{which}", "lr": lr, "step": st,
                                       **score_masks(p.evp, p.evg, list(eff))}), flush=True)
            with torch.no_grad():
                for n, v in keep.items():
                    named[n].copy_(v)
