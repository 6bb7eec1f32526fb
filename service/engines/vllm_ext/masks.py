"""Many NPCs in one vLLM batch: the FFN channel mask rides vLLM's multi-LoRA routing.

An NPC pruned from a base differs from it only in which FFN channels it keeps, so
the dense base with the NPC's 0/1 channel mask applied to each `down_proj` input
computes the NPC's model. vLLM already routes every token of a batch to its
request's adapter slot (multi-LoRA serving); we reuse that routing and replace the
adapter arithmetic on `down_proj` with a mask: the "adapter" of an NPC is a rank-1
LoRA whose A row is its channel mask (B is zero and unused). Requests of different
NPCs then share decode batches on one engine, at the cost of running the dense FFN.

The layer class is registered when this module is imported, which happens in each
vLLM worker before the model is built (it is imported by the worker extension).
It only replaces `down_proj` and only in engines started with NPC_MASK_ENGINE=1, so
ordinary LoRA engines are unaffected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from service.engines.launch import MASK_ENGINE_ENV
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_mask_adapter(out_dir: Path, kept: Sequence[Sequence[int]], intermediate: int, hidden: int,
                       base_dir: str, scales: Sequence[Sequence[float]] | None = None) -> Path:
    """A PEFT-format adapter directory holding an NPC's channel masks (a few hundred KB).

    With `scales` the mask holds each kept channel's scale instead of 1 (the exported model
    folds the same scales into down_proj)."""
    from safetensors.torch import save_file

    from pruning.files import write_atomic_dir

    tensors = {}
    for i, idx in enumerate(kept):
        # fp32: an fp32 engine then applies exactly the scales its checkpoint folds in
        m = torch.zeros(1, intermediate, dtype=torch.float32)
        m[0, torch.tensor(list(idx), dtype=torch.long)] = (
            1 if scales is None else torch.tensor(list(scales[i]), dtype=torch.float32))
        tensors[f"base_model.model.model.layers.{i}.mlp.down_proj.lora_A.weight"] = m
        tensors[f"base_model.model.model.layers.{i}.mlp.down_proj.lora_B.weight"] = \
            torch.zeros(hidden, 1, dtype=torch.bfloat16)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps({
            "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["down_proj"],
            "base_model_name_or_path": base_dir, "bias": "none", "task_type": "CAUSAL_LM",
            "lora_dropout": 0.0, "npc_channel_mask": True,
        }))

    return write_atomic_dir(Path(out_dir), fill)


def _register() -> None:
    from vllm.lora import utils as lora_utils
    from vllm.lora.layers import RowParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import RowParallelLinear

    class MaskedDownProj(RowParallelLinearWithLoRA):
        """down_proj whose input channels are masked per token by the token's NPC."""

        def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
            super().create_lora_weights(max_loras, lora_config, model_config)
            # row -1 (no adapter: the dense base) keeps every channel
            self.npc_masks = torch.ones(max_loras + 1, self.input_size, dtype=lora_config.lora_dtype,
                                        device=self.device)

        def reset_lora(self, index: int) -> None:
            super().reset_lora(index)
            self.npc_masks[index] = 1

        def set_lora(self, index: int, lora_a, lora_b) -> None:
            self.npc_masks[index].copy_(lora_a[0, : self.input_size])

        def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            # the wrapper's whole index buffer cut to this batch's rows: its `token_lora_indices`
            # cuts by a Python-side length, which torch.compile would freeze at trace time. Rows past
            # the batch's tokens are padding; the clamp keeps their stale (or unset) indices in range.
            n = x.shape[-2] if x.ndim == 3 else x.shape[0]
            idx = self.punica_wrapper._token_lora_indices[:n].clamp(-1, self.npc_masks.shape[0] - 2)
            x = x * self.npc_masks[idx].view(*x.shape[:-1], -1)
            return self._get_quant_method().apply(self.base_layer, x, bias)

        @classmethod
        def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None,
                              **kw) -> bool:
            return (type(source_layer) is RowParallelLinear
                    and getattr(source_layer, "prefix", "").endswith("down_proj"))

    if MaskedDownProj.__name__ not in {c.__name__ for c in lora_utils._all_lora_classes}:
        lora_utils._all_lora_classes = (MaskedDownProj, *lora_utils._all_lora_classes)


if os.environ.get(MASK_ENGINE_ENV) == "1":
    _register()
