"""Where NPC checkpoints live: the local data dir, or any fsspec URL (s3://..., S3-compatible).

Publishing uploads every file and the manifest last: a checkpoint without its
manifest is incomplete and never fetched. Fetching downloads into a local
cache beside, verifies every file's sha256 against the manifest, then renames
into place, so engines only ever load complete, verified files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pruning.export import MANIFEST, CorruptCheckpoint, verify_checkpoint


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

    def publish(self, local_dir: Path, npc_id: str) -> str:
        """Make a finished local checkpoint available to every host; returns its reference."""
        if not self.url:
            return str(local_dir)
        fs = self._fs()
        dest = f"{self.url}/{npc_id}"
        files = sorted(p for p in Path(local_dir).iterdir() if p.is_file() and p.name != MANIFEST)
        for f in files:
            fs.put_file(str(f), f"{dest}/{f.name}")
        fs.put_file(str(Path(local_dir) / MANIFEST), f"{dest}/{MANIFEST}")  # the commit marker
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
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=self.cache_dir))
        try:
            fs.get_file(f"{path}/{MANIFEST}", str(tmp / MANIFEST))
            for name in json.loads((tmp / MANIFEST).read_text()).get("files", {}):
                if name != MANIFEST:
                    fs.get_file(f"{path}/{name}", str(tmp / name))
            verify_checkpoint(tmp)
            tmp.chmod(0o755)
            os.replace(tmp, local)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return local

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
