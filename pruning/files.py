"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of one.

Everything is built beside its destination (same directory, so the same filesystem) and moved
into place with `os.replace`. Importable without torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


def write_atomic_file(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own per writer (not mkstemp: the file keeps the usual umask permissions)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    return write_atomic_file(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def write_atomic_bytes(path: Path, data: bytes) -> Path:
    return write_atomic_file(path, lambda tmp: tmp.write_bytes(data))


def write_atomic_dir(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory beside `out_dir` and rename it into place: never half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
