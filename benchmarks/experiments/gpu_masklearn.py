"""Mask learning and export on a Llama-3.2-3B-shaped model with random weights (GPU workers).

    python -m benchmarks.experiments.gpu_masklearn --device cuda [--shape llama-3.2-3b] [--out DIR]
    python -m benchmarks.experiments.gpu_masklearn --device cpu --shape tiny      # smoke test of the script

No weights can reach a GPU test machine, so the model is random with the real shapes; token ids
are random too. What it times is what a GPU worker runs for one persona: the dense pass (KL
targets + activation norms), the Fisher initialisation, the default profile's mask-learning
steps and then its per-channel scale steps on the fixed mask, and the export (scales folded
into down_proj, structural prune, safetensors write, manifest digests); then it checks that the
compact form (kept indices + scales) materialises to the exported tensors. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.checkpoint import export_checkpoint, fold_scales, keep_count, kept_scales, materialize, select_kept
from pruning.manifest import Manifest
from pruning.methods.persona_pruner.masklearn import MaskTrainer
from pruning.model_io import frozen
from pruning.options import config_for, profile
from pruning.prefix_forward import Example

SHAPES = {
    # Llama-3.2-3B: hidden 3072, FFN 8192, 28 layers, 24 heads / 8 KV heads, vocab 128256
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


class _Tok:
    """The two things mask learning and export need of a tokenizer (ids are random here)."""
    pad_token_id = 0
    eos_token_id = 0

    def save_pretrained(self, d):
        Path(d, "tokenizer_config.json").write_text("{}")


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-3.2-3b", choices=sorted(SHAPES))
    ap.add_argument("--sparsity", type=float, default=0.25)
    default = profile("default")
    ap.add_argument("--examples", type=int, default=default["n_instructions"],
                    help="training examples (default: the default profile's instructions)")
    ap.add_argument("--batch-size", type=int, default=default["learn"]["batch_size"])
    ap.add_argument("--prompt", type=int, default=160, help="shared system-prompt tokens")
    ap.add_argument("--question", type=int, default=24)
    ap.add_argument("--answer", type=int, default=128)
    ap.add_argument("--steps", type=int, default=default["learn"]["steps"], help="mask steps")
    ap.add_argument("--scale-steps", type=int, default=default["learn"]["scale_steps"],
                    help="per-channel scale steps on the fixed mask")
    ap.add_argument("--out", default=None, help="folder for the JSON result")
    a = ap.parse_args(argv)
    dev = a.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    res: dict = {"shape": a.shape, "device": dev, "dtype": str(dtype).replace("torch.", ""),
                 "sparsity": a.sparsity, "examples": a.examples, "batch_size": a.batch_size,
                 "tokens_per_example": a.prompt + a.question + a.answer}
    if dev.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name(0)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[a.shape], max_position_embeddings=4096)
    t = time.time()
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    sync(dev)
    res["build_s"] = round(time.time() - t, 2)
    res["params"] = sum(p.numel() for p in model.parameters())
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, V, (a.prompt,), generator=g).tolist()
    examples = []
    for i in range(a.examples):
        q = torch.randint(1, V, (a.question,), generator=g).tolist()
        ans = torch.randint(1, V, (a.answer - (i % 16),), generator=g).tolist()  # varied lengths
        examples.append(Example(prefix + q + ans, len(prefix) + len(q)))
    k = keep_count(cfg.intermediate_size, a.sparsity)
    mcfg = config_for("default", steps=a.steps, scale_steps=a.scale_steps, batch_size=a.batch_size)
    tok = _Tok()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with frozen(model):
        t = time.time()
        tr = MaskTrainer(model, tok, examples, k, mcfg)
        sync(dev)
        res["dense_pass_and_fisher_init_s"] = round(time.time() - t, 2)
        for phase, n in (("mask", a.steps), ("scale", a.scale_steps)):
            if phase == "scale":
                res["swapped_channels"] = tr.swapped()
                tr.fix_mask()
            steps = []
            for _ in range(n):
                t = time.time()
                rec = tr.step()
                sync(dev)
                steps.append(time.time() - t)
            if not steps:
                continue
            warm = steps[1:] or steps
            res[f"{phase}_step_s"] = [round(x, 3) for x in steps]
            res[f"{phase}_step_s_median_after_first"] = round(sorted(warm)[len(warm) // 2], 3)
            res[f"{phase}_steps_total_s"] = round(sum(steps), 2)
            res[f"{phase}_last_loss"] = rec["loss"]
    if dev.startswith("cuda"):
        res["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    kept = select_kept(list(tr.scores.detach()), k)
    assert all(len(x) == k for x in kept)
    scales = kept_scales(None if tr.sc.scale is None else list(tr.sc.scale.detach()), kept)
    res["kept_per_layer"] = k
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        t = time.time()
        model.save_pretrained(base, safe_serialization=True)
        tok.save_pretrained(base)
        res["save_dense_s"] = round(time.time() - t, 2)
        t = time.time()
        if scales is not None:
            with torch.no_grad():
                fold_scales(model, kept, scales)
        out = export_checkpoint(model, tok, kept, Path(tmp) / "npc", base_dir=base, method="persona-pruner",
                                sparsity=a.sparsity, persona="random-weights benchmark", scales=scales)
        sync(dev)
        res["export_s"] = round(time.time() - t, 2)
        res["checkpoint_bytes"] = sum(f.stat().st_size for f in out.iterdir())
        man = Manifest.read(out)
        res["compact_bytes"] = len(json.dumps(man.kept_indices)) + len(json.dumps(man.channel_scales))
        t = time.time()
        mat = materialize(base, kept, scales=scales)
        res["materialize_s"] = round(time.time() - t, 2)
        saved = {}
        for f in sorted(out.glob("*.safetensors")):
            saved.update(load_file(f))
        same = all(torch.equal(mat[n].to(saved[n].dtype), saved[n]) for n in saved if n in mat)
        res["compact_equals_full"] = bool(same and set(saved) <= set(mat))
    print(json.dumps(res), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, f"gpu_masklearn_{a.shape}.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
