"""NPC checkpoints: where they live (the local data dir, or any fsspec URL: s3://...), and opening
one for serving, verified once per on-disk state.

Publishing uploads every file and the manifest last: a checkpoint without its manifest is
incomplete and never fetched. Fetching downloads into a local cache beside, verifies every
file's sha256 against the manifest, then renames into place, so engines only ever load
complete, verified files; a fetched copy is not hashed again when it is opened.
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pruning.files import write_atomic_dir
from pruning.manifest import MANIFEST, CorruptCheckpoint, Manifest, checkpoint_sha256

# per-file hashing of these is left out when a mixed engine rebuilds the NPC from its base
WEIGHT_SUFFIXES = (".safetensors",)
PUBLISH_TRIES = 6  # about 30 s of backoff before a publish gives up


def _stat_key(ckpt: str) -> tuple:
    d = Path(ckpt)
    if not d.is_dir():
        return (ckpt, None)
    return (ckpt, tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir())))


_TRUSTED: set[tuple] = set()  # stat keys of directories this process verified while fetching them


@dataclass(frozen=True)
class OpenedCheckpoint:
    path: Path
    manifest: Manifest            # without the per-channel lists (those are in `kept`/`scales`)
    config: dict
    base_dir: str | None = None   # the base the compact form rebuilds from, when it is here
    kept: tuple | None = None     # per layer, int arrays (compact form)
    scales: tuple | None = None   # per layer, float arrays, or None


@lru_cache(maxsize=16)
def _base_matches(base_dir: str, sha: str, stat: tuple) -> bool:
    return checkpoint_sha256(Path(base_dir)) == sha


def base_for(manifest: Manifest) -> str | None:
    """The base checkpoint the compact form refers to, if it is here and is the same bytes."""
    base = manifest.base_model
    if not base or not manifest.base_sha256 or not Path(base).is_dir():
        return None
    files = sorted(Path(base).glob("*.safetensors"))
    stat = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return base if files and _base_matches(base, manifest.base_sha256, stat) else None


@lru_cache(maxsize=1024)
def _opened(stat_key: tuple, mixed: bool) -> OpenedCheckpoint:
    """Hash-check a checkpoint once per on-disk state (names, sizes, mtimes).

    A mixed engine builds a compact NPC from the base and its kept indices, so that NPC's own
    weight files are never read: they are not hashed either (~0.4 s per 220 MB)."""
    ckpt = Path(stat_key[0])

    def skip(m: Manifest) -> tuple[str, ...]:
        return WEIGHT_SUFFIXES if mixed and m.has_compact_form and base_for(m) else ()

    manifest = Manifest.read(ckpt) if stat_key in _TRUSTED else Manifest.verify(ckpt, skip)
    base = kept = scales = None
    if manifest.has_compact_form:
        base = base_for(manifest)
        if base:
            kept = tuple(array("i", k) for k in manifest.kept_indices)
            raw = manifest.channel_scales
            scales = None if raw is None else tuple(array("f", x) for x in raw)
    slim = Manifest({k: v for k, v in manifest.to_dict().items() if k not in ("kept_indices", "channel_scales")})
    config = json.loads((ckpt / "config.json").read_text())
    return OpenedCheckpoint(ckpt, slim, config, base, kept, scales)


@lru_cache(maxsize=16)
def _opened_base(stat_key: tuple) -> OpenedCheckpoint:
    base = Path(stat_key[0])
    config = json.loads((base / "config.json").read_text())
    every = array("i", range(config["intermediate_size"]))
    manifest = Manifest({"base_model": str(base), "base_sha256": checkpoint_sha256(base), "files": {}})
    return OpenedCheckpoint(base, manifest, config, str(base), tuple(every for _ in range(config["num_hidden_layers"])))


def open_base(base_dir: str) -> OpenedCheckpoint:
    """The dense base as a compact "checkpoint" that keeps every channel: what a prompt-only NPC (or
    one whose prune still runs) is served with, by the same engines as pruned NPCs (hashed once per
    on-disk state)."""
    return _opened_base(_stat_key(str(base_dir)))


class CheckpointStore:
    def __init__(self, url: str | None, cache_dir: Path, storage_options: dict | None = None):
        self.url = url.rstrip("/") if url else None
        self.cache_dir = Path(cache_dir)
        self.options = storage_options or {}

    def _fs(self):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(self.url, **self.options)
        return fs

    def is_remote(self, ref: str) -> bool:
        return "://" in ref

    def publish(self, local_dir: Path, name: str, tries: int = PUBLISH_TRIES, wait_max_s: float = 16.0) -> str:
        """Make a finished local checkpoint available to every host as `name`; returns its reference.

        A store that fails (unreachable, throttling, a 5xx) is tried again with exponential backoff,
        `tries` times in all: every upload overwrites, so a retry after a partial one is safe."""
        if not self.url:
            return str(local_dir)
        from tenacity import Retrying, stop_after_attempt, wait_exponential

        for attempt in Retrying(stop=stop_after_attempt(tries), wait=wait_exponential(multiplier=0.5, max=wait_max_s),
                                reraise=True):
            with attempt:
                return self._upload(Path(local_dir), f"{self.url}/{name}")
        raise AssertionError("unreachable")

    def _upload(self, local_dir: Path, dest: str) -> str:
        fs = self._fs()
        files = sorted(p for p in local_dir.iterdir() if p.is_file() and p.name != MANIFEST)
        fs.makedirs(dest, exist_ok=True)  # a directory store does not create folders on put (S3 has none)
        for f in files:
            fs.put_file(str(f), f"{dest}/{f.name}")
        fs.put_file(str(local_dir / MANIFEST), f"{dest}/{MANIFEST}")  # the commit marker
        return dest

    def fetch(self, ref: str) -> Path:
        """A local, verified directory for this checkpoint reference."""
        if not self.is_remote(ref):
            return Path(ref)
        import fsspec

        fs, path = fsspec.core.url_to_fs(ref, **self.options)
        local = self.cache_dir / Path(path).name
        if (local / MANIFEST).is_file():
            return local
        if not fs.exists(f"{path}/{MANIFEST}"):
            raise CorruptCheckpoint(f"checkpoint {ref}: {MANIFEST} is missing in the store")

        def fill(tmp: Path) -> None:
            fs.get_file(f"{path}/{MANIFEST}", str(tmp / MANIFEST))
            manifest = Manifest.read(tmp)
            manifest.check_names()  # before any name becomes a local path
            for name in manifest.files:
                if name != MANIFEST:
                    fs.get_file(f"{path}/{name}", str(tmp / name))
            Manifest.verify(tmp)

        write_atomic_dir(local, fill)
        _TRUSTED.add(_stat_key(str(local)))
        return local

    def open(self, ref: str, mixed: bool = False) -> OpenedCheckpoint:
        """Fetch (when remote) and verify once: what an engine needs to load this NPC."""
        return _opened(_stat_key(str(self.fetch(ref))), mixed)

    def delete(self, ref: str) -> None:
        if self.is_remote(ref):
            import fsspec

            fs, path = fsspec.core.url_to_fs(ref, **self.options)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            shutil.rmtree(self.cache_dir / Path(path).name, ignore_errors=True)
        else:
            shutil.rmtree(ref, ignore_errors=True)


def from_settings(settings) -> CheckpointStore:
    opts = {}
    endpoint = os.environ.get("NPC_STORE_ENDPOINT_URL")
    if endpoint:  # an S3-compatible service other than AWS (MinIO, Ceph, R2, ...)
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return CheckpointStore(settings.store_url, settings.data / "cache", opts)
