"""Runs inside each vLLM worker (`worker_extension_cls`): NPC weight swaps from a shared base.

A pruned NPC differs from its base only in which FFN channels it keeps. The worker
maps the base's safetensors once (mmap, read-only) and builds an NPC's gate/up rows
and down columns by index-select, so a swap moves a few KB of indices over the RPC
and reads no per-NPC file. Loading goes through vLLM's own in-place reload
(`model_runner.reload_weights(weights_iterator=...)`), which restores the CPU
backend's oneDNN-packed layers, loads, and re-packs them, exactly as a reload from
a checkpoint directory does.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import torch

from service.engines.vllm_ext import masks  # noqa: F401  registers the masked down_proj in this worker
from service.engines.vllm_ext import seeds

seeds.patch()

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_FFN_ROWS = (".mlp.gate_proj.weight", ".mlp.up_proj.weight")
_FFN_COLS = ".mlp.down_proj.weight"


def _mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a private read-only mapping of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        buf = raw[8 + n + start: 8 + n + end]
        out[name] = buf.view(_DTYPES[meta["dtype"]]).view(meta["shape"])
    return out


def _layer(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        if i < len(parts) and parts[i].isdigit():
            return int(parts[i])
    return None


def _is_ffn(name: str) -> bool:
    return name.endswith(_FFN_ROWS) or name.endswith(_FFN_COLS)


class NpcSwapWorker:
    """Mixed into vLLM's worker class; methods are called by name through collective_rpc."""

    _npc_base: dict[str, dict[str, torch.Tensor]]
    _npc_base_clean: bool  # non-FFN weights currently equal the base's

    def _npc_base_tensors(self, base_dir: str) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_npc_base"):
            self._npc_base = {}
        if base_dir not in self._npc_base:
            tensors = {}
            for f in sorted(Path(base_dir).glob("*.safetensors")):
                tensors.update(_mmap_safetensors(f))
            if not tensors:
                raise FileNotFoundError(f"no safetensors in base {base_dir}")
            self._npc_base = {base_dir: tensors}  # one base per engine: its shape key fixes it
        return self._npc_base[base_dir]

    def _npc_reload(self, weights) -> None:
        from vllm.config import set_current_vllm_config

        # layers left out of a partial reload keep their packed weights; vLLM warns for each
        quiet = [logging.getLogger(n) for n in ("vllm.model_executor.model_loader.reload.layerwise",
                                                 "vllm.model_executor.model_loader.reload.inplace")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            with set_current_vllm_config(self.vllm_config):
                self.model_runner.reload_weights(weights_iterator=weights)
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)

    def _npc_refresh_tied_head(self) -> None:
        """A reload skips a tied lm_head and keeps its old packed copy: re-pack it from the embeddings."""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        qm = getattr(head, "quant_method", None)
        if head is not None and qm is not None and getattr(model.config, "tie_word_embeddings", False):
            qm.process_weights_after_loading(head)

    def npc_swap_compact(self, base_dir: str, kept: list[list[int]],
                         scales: list[list[float]] | None = None) -> dict:
        """Load base weights with only the kept FFN channels (down columns times `scales`)."""
        from pruning.checkpoint import scaled_columns

        t0 = time.perf_counter()
        base = self._npc_base_tensors(base_dir)
        idx = [torch.tensor(k, dtype=torch.long) for k in kept]
        sc = None if scales is None else [torch.tensor(x, dtype=torch.float32) for x in scales]
        clean = getattr(self, "_npc_base_clean", False)

        def weights():
            for name, t in base.items():
                layer = _layer(name)
                if layer is not None and name.endswith(_FFN_ROWS):
                    yield name, t.index_select(0, idx[layer])
                elif layer is not None and name.endswith(_FFN_COLS):
                    cols = t.index_select(1, idx[layer])
                    yield name, cols if sc is None else scaled_columns(cols, sc[layer])
                elif not clean:  # after a foreign checkpoint: restore the base's other weights too
                    yield name, t

        self._npc_reload(weights())
        if not clean:
            self._npc_refresh_tied_head()
        self._npc_base_clean = True
        return {"seconds": time.perf_counter() - t0, "ffn_only": clean}

    def npc_swap_dir(self, path: str) -> dict:
        """Load a whole checkpoint directory (an NPC with no compact form)."""
        t0 = time.perf_counter()
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.reload_weights(weights_path=path)
        self._npc_refresh_tied_head()
        self._npc_base_clean = False
        return {"seconds": time.perf_counter() - t0}

    def npc_mark_started(self, base_clean: bool) -> None:
        """The engine's first weights came from a checkpoint whose non-FFN weights are (not) the base's."""
        self._npc_base_clean = base_clean
