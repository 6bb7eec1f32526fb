"""Recovery fine-tuning: LoRA on the persona's synthetic data after pruning, merged before export.

The pruned model is trained as the channel-masked dense model (identical outputs), with the
mask applied to the whole down_proj input (LoRA path included), so merging and then slicing
the kept channels gives exactly the trained model. Depth-pruned models train with their
blocks already removed.
"""

from __future__ import annotations

import random
import time
from typing import Callable

import torch

from pruning import PruneError
from pruning.chat import pad_id_of
from pruning.model_io import model_device
from pruning.prefix_forward import Example, channel_mask, kept_masks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(examples: list[Example], pad: int, device):
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, : len(e.ids)] = torch.tensor(e.ids)
        labels[r, e.n_prompt: len(e.ids)] = torch.tensor(e.ids[e.n_prompt:])
        mask[r, : len(e.ids)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def lora_recover(model, tok, kept: list[torch.Tensor] | None, examples: list[Example], *, steps: int = 30,
                 rank: int = 8, alpha: int = 16, lr: float = 5e-4, batch_size: int = 4, seed: int = 0,
                 progress: Callable[[float], None] = lambda f: None) -> dict:
    """Train LoRA adapters on `examples` (loss on the answer tokens), merge them into `model`."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PruneError("recovery needs the `peft` package (pip install peft)") from None
    if not examples:
        raise PruneError("recovery needs at least one synthetic example")
    t0 = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = model_device(model)
    was_training = model.training
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    peft_model = get_peft_model(model, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    # LoRA trains in fp32 even on a bf16 base: tiny updates vanish in bf16
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad = pad_id_of(tok)
    losses = []
    masks = kept_masks(model, kept) if kept is not None else None
    peft_model.train()
    try:
        with channel_mask(model, masks):
            for step in range(steps):
                batch = rng.sample(examples, min(batch_size, len(examples)))
                ids, attn, labels = _batch(batch, pad, device)
                with torch.autocast(device.type, dtype=torch.bfloat16,
                                    enabled=next(model.parameters()).dtype == torch.bfloat16):
                    loss = peft_model(input_ids=ids, attention_mask=attn, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                progress((step + 1) / steps)
    finally:
        merged = peft_model.merge_and_unload()
        merged.train(was_training)
        for p in merged.parameters():
            p.requires_grad_(False)
    return {"steps": steps, "rank": rank, "lr": lr, "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(sum(losses[-5:]) / max(len(losses[-5:]), 1), 4) if losses else None,
            "seconds": round(time.time() - t0, 2)}
