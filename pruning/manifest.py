"""A checkpoint's `manifest.json`: what was pruned from which base, and every file's sha256.

One type, `Manifest`, over the JSON format every NPC checkpoint carries (unchanged): the dict as
written, with typed accessors for the keys this project reads. Importable without torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pruning import PruneError

MANIFEST = "manifest.json"


class CorruptCheckpoint(PruneError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_sha256(model_dir: Path) -> str:
    """One digest over every weight file of a checkpoint (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise PruneError(f"no *.safetensors weights in {model_dir}")
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _field(key: str, doc: str, empty: Callable | None = None) -> property:
    def get(self: "Manifest"):
        value = self.data.get(key)
        return empty() if value is None and empty is not None else value

    return property(get, doc=doc)


@dataclass
class Manifest:
    """The manifest's dict (`data`, exactly the JSON) with typed accessors; other keys (a method's
    own report, `recovery`, ...) through `get` / `[]`."""

    data: dict = field(default_factory=dict)

    # -- reading and writing ---------------------------------------------------------

    @classmethod
    def read(cls, ckpt_dir: Path) -> "Manifest":
        p = Path(ckpt_dir) / MANIFEST
        if not p.is_file():
            raise PruneError(f"{ckpt_dir} has no {MANIFEST}")
        return cls(json.loads(p.read_text()))

    @classmethod
    def verify(cls, ckpt_dir: Path, skip: Callable[["Manifest"], tuple[str, ...]] = lambda m: ()) -> "Manifest":
        """The manifest, after checking every file it lists against its sha256 (CorruptCheckpoint
        otherwise). `skip(manifest)` names file suffixes not to read (weights that will come from
        elsewhere)."""
        ckpt_dir = Path(ckpt_dir)
        try:
            m = cls(json.loads((ckpt_dir / MANIFEST).read_text()))
        except FileNotFoundError:
            raise CorruptCheckpoint(f"checkpoint {ckpt_dir.name}: {MANIFEST} is missing") from None
        except ValueError as e:  # other OSErrors (EMFILE, EIO, a store's 403) pass on: they are not the bytes' fault
            raise CorruptCheckpoint(f"checkpoint {ckpt_dir.name}: {MANIFEST} unreadable ({e})") from None
        if not m.files:
            raise CorruptCheckpoint(f"checkpoint {ckpt_dir.name}: manifest lists no file digests")
        m.check_names()
        unread = skip(m)
        for name, digest in m.files.items():
            if unread and name.endswith(unread):
                continue
            f = ckpt_dir / name
            if not f.is_file():
                raise CorruptCheckpoint(f"checkpoint {ckpt_dir.name}: file {name} is missing")
            if sha256_file(f) != digest:
                raise CorruptCheckpoint(f"checkpoint {ckpt_dir.name}: file {name} does not match its sha256")
        return m

    def seal(self, ckpt_dir: Path) -> Path:
        """Record the digest of every file now in `ckpt_dir` (`files`) and write the manifest there
        (inside a directory that is moved into place as a whole: `files.write_atomic_dir`)."""
        ckpt_dir = Path(ckpt_dir)
        self.data["files"] = {f.name: sha256_file(f) for f in sorted(ckpt_dir.iterdir()) if f.is_file()}
        p = ckpt_dir / MANIFEST
        p.write_text(json.dumps(self.data))
        return p

    def to_dict(self) -> dict:
        return self.data

    # -- the dict ----------------------------------------------------------------------

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def __getitem__(self, key: str):
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    # -- typed accessors (read-only; None, or the empty value given, when the key is absent) ----

    base_model = _field("base_model", "str | None: the base checkpoint's directory")
    base_sha256 = _field("base_sha256", "str | None: `checkpoint_sha256` of the base")
    method = _field("method", "str | None")
    sparsity = _field("sparsity", "float | None")
    persona = _field("persona", "str | None")
    system_prompt = _field("system_prompt", "str | None: the chat-time system prompt, when not the persona")
    kept_indices = _field("kept_indices", "list[list[int]] | None: kept channels per layer (the compact form)")
    channel_scales = _field("channel_scales", "list[list[float]] | None: per layer, in kept order")
    dropped_layers = _field("dropped_layers", "list[int]: decoder blocks removed (depth pruning)", list)
    files = _field("files", "dict[str, str]: file name -> sha256", dict)

    def check_names(self) -> None:
        """Every listed file is a plain name inside the checkpoint: a manifest from a store must not
        make a fetch write, or a verify read, anywhere else."""
        for name in self.files:
            if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
                    or "\x00" in name):
                raise CorruptCheckpoint(f"manifest lists a file name that is not a plain name: {name!r}")

    intermediate_size = _field("intermediate_size", "int | None: FFN channels per layer after pruning")

    @property
    def has_compact_form(self) -> bool:
        """The compact form (kept indices + scales over the base) rebuilds the weights only when
        nothing but the channel choice changed."""
        return bool(self.kept_indices) and self.data.get("compact", True) is not False and not self.dropped_layers
