"""Child processes that must not outlive this one, even when it dies by SIGKILL.

vLLM runs each engine in child processes (its EngineCore and, on CPU, a worker). A clean
shutdown stops them; a parent killed outright (a worker SIGKILLed mid-prune, the OOM killer) left
them running, each holding its model and KV cache and spinning a core, so the next worker on the
host started beside them. Engines start inside `guarded_children()`: the processes that appear
during the block go to a guard, a small process that kills them once this one is gone.

The guard notices the parent's death by being re-parented (polled, so it does not matter which
thread started it: PR_SET_PDEATHSIG fires when the starting *thread* exits) and by the end of its
stdin (the parent's exit closes the pipe).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

_GUARD = r"""
import os, sys, threading, time
import psutil
parent, watched, lock = os.getppid(), {}, threading.Lock()
def read():
    for line in sys.stdin:
        pid, t = line.split()
        with lock:
            watched[int(pid)] = float(t)
    os._exit(finish())
def finish():
    with lock:
        for pid, t in watched.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - t) < 0.01:  # the same process, not a reused pid
                    p.kill()
            except psutil.Error:
                pass
    return 0
threading.Thread(target=read, daemon=True).start()
while os.getppid() == parent:
    time.sleep(0.5)
os._exit(finish())
"""

_lock = threading.Lock()
_guard: subprocess.Popen | None = None


def die_with_parent() -> None:
    """In a child before exec: SIGTERM it when its parent dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _descendants() -> set[tuple[int, float]]:
    """(pid, start time) of every process below this one: a pid alone may be reused."""
    import psutil

    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            out.add((p.pid, p.create_time()))
        except psutil.Error:
            pass
    return out


@contextmanager
def guarded_children():
    """Every process started (below this one) inside the block is killed when this process is gone."""
    before = _descendants()
    try:
        yield
    finally:
        new = sorted(_descendants() - before)
        if new:
            _hand_over(new)


def _hand_over(keys: list[tuple[int, float]]) -> None:
    global _guard
    with _lock:
        if _guard is None or _guard.poll() is not None:
            _guard = subprocess.Popen([sys.executable, "-c", _GUARD], stdin=subprocess.PIPE, text=True,
                                      stdout=subprocess.DEVNULL, start_new_session=True)
        for pid, t in keys:
            if pid != _guard.pid:
                _guard.stdin.write(f"{pid} {t}\n")
        _guard.stdin.flush()


def guard_pid() -> int | None:
    """The guard's pid while one runs (tests)."""
    return _guard.pid if _guard is not None and _guard.poll() is None else None
