"""Least-squares compensation of down_proj after the default mask (an experiment, not a method).

    .venv/bin/python -m benchmarks.experiments.compensation_probe PERSONAS ALPHAS TAG
    .venv/bin/python -m benchmarks.experiments.compensation_probe 0,3 0.001,0.01,0.1 lsq

Learns the default profile's mask and scales on each persona's cached synthetic set, then refits
the kept down_proj columns of every layer by ridge regression so that the pruned FFN's output
matches the dense FFN's on the synthetic set's tokens:
    W' = argmin sum_t |W z_t - W' z'_t,kept|^2 + lam |W' - W_kept diag(scales)|^2
with z the dense model's down_proj input and z' either the same (`dense` inputs) or the pruned
model's (`pruned` inputs: the mask and scales applied, one pass, so each layer sees the
uncompensated layers before it). lam = alpha * mean diagonal of the kept Gram matrix.
Prints one PROBE json line per persona and variant; results are in docs/quality_experiments.md.
"""
import sys, time, json
import torch
from benchmarks.experiments.probe_common import persona_runs, score_masks
from pruning.chat import pad_id_of
from pruning.checkpoint import kept_scales, select_kept
from pruning.methods.persona_pruner.masklearn import learn_scores
from pruning.model_io import ffn_blocks, frozen
from pruning.options import config_for
from pruning.prefix_forward import channel_mask, forward_suffixes, kept_masks, prefix_kv, shared_prompt_len


@torch.no_grad()
def grams(model, tok, ex, masks, binary, batch=8):
    """Per layer: G = sum z z^T (dense inputs), X = sum z z'^T and G' = sum z' z'^T (pruned inputs:
    the model runs under `masks`, z' is the down_proj input with the dropped channels zeroed)."""
    blocks = ffn_blocks(model)
    C = blocks[0].down_proj.in_features
    P = shared_prompt_len(ex)
    pad = pad_id_of(tok)
    G = [torch.zeros(C, C) for _ in blocks]
    X = [torch.zeros(C, C) for _ in blocks]
    Gp = [torch.zeros(C, C) for _ in blocks]
    cap: dict[int, torch.Tensor] = {}

    def hook(i):
        def pre(_m, args):
            cap[i] = args[0]
        return pre

    hs = [b.down_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        # the shared prefix (the persona's system prompt) goes through every FFN once per example:
        # its tokens count len(ex) times (leaving them out lets W' blow up the attention-sink tokens)
        kvd = prefix_kv(model, ex[0].ids[:P]) if P else None
        zd = {i: z.reshape(-1, C).float() for i, z in cap.items()}
        cap.clear()
        with channel_mask(model, masks):
            kvp = prefix_kv(model, ex[0].ids[:P]) if P else None
        for i, z in cap.items():
            zp = z.reshape(-1, C).float() * binary[i].float()
            G[i] += len(ex) * zd[i].T @ zd[i]
            X[i] += len(ex) * zd[i].T @ zp
            Gp[i] += len(ex) * zp.T @ zp
        for s in range(0, len(ex), batch):
            suf = [e.ids[P:] for e in ex[s:s + batch]]
            T = max(map(len, suf))
            valid = torch.tensor([[t < len(x) for t in range(T)] for x in suf]).reshape(-1)
            cap.clear()
            forward_suffixes(model, kvd, P, suf, pad)
            zd = {i: z.reshape(-1, C)[valid].float() for i, z in cap.items()}
            cap.clear()
            with channel_mask(model, masks):
                forward_suffixes(model, kvp, P, suf, pad)
            # our hook was registered first, so it saw the input before the mask's hook
            for i, z in cap.items():
                zp = z.reshape(-1, C)[valid].float() * binary[i].float()
                G[i] += zd[i].T @ zd[i]
                X[i] += zd[i].T @ zp
                Gp[i] += zp.T @ zp
    finally:
        for h in hs:
            h.remove()
    return G, X, Gp


def solve(W, cross, gram, kept, w0, alpha):
    """argmin_W' |W Z - W' Z'_k|^2 + lam |W' - w0|^2 from W Z Z'_k^T = W cross[:, k] and Z'_k Z'_k^T."""
    A = gram[kept][:, kept]
    lam = alpha * A.diagonal().mean()
    B = W @ cross[:, kept] + lam * w0
    return torch.linalg.solve(A + lam * torch.eye(len(kept)), B.T).T


if __name__ == "__main__":
    us = [int(x) for x in sys.argv[1].split(",")]
    alphas = [float(x) for x in sys.argv[2].split(",")]
    tag = sys.argv[3]
    out = []
    for p in persona_runs(us):
        ex = p.examples
        t = time.time()
        with frozen(p.work):
            res = learn_scores(p.work, p.tok, ex, p.k, config_for("default", seed=0))
        kept = select_kept(res.scores, p.k)
        sc = kept_scales(res.scales, kept)
        binary = kept_masks(p.work, kept)
        eff = [m.clone().float() for m in binary]
        for m, idx, s in zip(eff, kept, sc):
            m[idx] = s
        t1 = time.time()
        G, X, Gp = grams(p.work, p.tok, ex, eff, binary)
        gram_s = time.time() - t1
        Ws = [b.down_proj.weight.detach().float().clone() for b in ffn_blocks(p.work)]
        variants = {}
        for alpha in alphas:
            for inputs in ("dense", "pruned"):
                new = []
                for W, g, x, gp, idx, s in zip(Ws, G, X, Gp, kept, sc):
                    w0 = W[:, idx] * s[None, :]
                    new.append(solve(W, g if inputs == "dense" else x, g if inputs == "dense" else gp, idx, w0, alpha))
                variants[(inputs, alpha)] = new
        out.append((p, kept, eff, binary, variants, round(t1 - t), round(gram_s)))
        print("LEARNED", p.u, round(t1 - t), "gram", round(gram_s), flush=True)
    for p, kept, eff, binary, variants, learn_s, gram_s in out:
        print("PROBE", json.dumps({"tag": tag, "persona": p.u, "variant": "mask+scales",
                                   **score_masks(p.evp, p.evg, eff), "learn_s": learn_s}), flush=True)
        blocks = ffn_blocks(p.model)
        orig = [b.down_proj.weight.detach().clone() for b in blocks]
        for (inputs, alpha), new in variants.items():
            with torch.no_grad():
                for b, idx, w in zip(blocks, kept, new):
                    b.down_proj.weight[:, idx] = w.to(b.down_proj.weight.dtype)
            try:
                kl = score_masks(p.evp, p.evg, binary)
            finally:
                with torch.no_grad():
                    for b, w in zip(blocks, orig):
                        b.down_proj.weight.copy_(w)
            print("PROBE", json.dumps({"tag": tag, "persona": p.u, "variant": f"lsq-{inputs}", "alpha": alpha,
                                       **kl, "gram_s": gram_s}), flush=True)
