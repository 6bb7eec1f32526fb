"""The working precision of persona-pruner's passes: bfloat16 where the CPU runs it fast."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from pruning import PruneError


def _bf16_fast(device: torch.device) -> bool:
    if device.type != "cpu":
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except Exception:
        return False


def compute_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """`auto`: bfloat16 where the hardware runs it fast (the shipped bases are bf16 anyway)."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if _bf16_fast(device) else None
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                "fp32": torch.float32, "float16": torch.float16}[name]
    except KeyError:
        raise PruneError(f"unknown compute_dtype {name!r}") from None


@contextmanager
def in_precision(model, dtype: torch.dtype | None):
    """The model in `dtype`: cast in place when the round trip is lossless, else on a copy."""
    orig = next(model.parameters()).dtype
    if dtype is None or dtype == orig:
        yield model
        return
    with torch.no_grad():
        lossless = all(torch.equal(p.to(dtype).to(orig), p) for p in model.parameters())
    if lossless:
        # the parameters round-trip exactly, floating buffers need not (rotary inv_freq): kept aside
        buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
        model.to(dtype)
        try:
            yield model
        finally:
            model.to(orig)
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
    else:
        work = copy.deepcopy(model).to(dtype)
        try:
            yield work
        finally:
            del work
