"""Engine processes do not outlive a process killed outright (SIGKILL): `pruning.procs`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

_PARENT = """
import subprocess, sys, time
from pruning.procs import guarded_children, guard_pid
outside = subprocess.Popen(["sleep", "600"])
with guarded_children():
    inside = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
print("PIDS", outside.pid, *[p.pid for p in inside], guard_pid(), flush=True)
time.sleep(600)
"""

_ENGINE = """
import sys, time
import psutil
from pruning.generate import vllm_engine
from pruning.procs import guard_pid
vllm_engine.engine(sys.argv[1])
print("PIDS", guard_pid(), *[p.pid for p in psutil.Process().children(recursive=True)], flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _start(code: str, *args: str) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # vLLM logs on stdout too
        if line.startswith("PIDS "):
            return proc, [int(x) for x in line.split()[1:]]
    raise AssertionError(f"the parent exited with {proc.wait()}")


def test_processes_started_in_the_block_die_with_a_killed_parent():
    proc, (outside, *inside, guard) = _start(_PARENT)
    try:
        assert all(_alive(p) for p in [outside, *inside, guard])
        proc.kill()
        proc.wait()
        assert not _gone_within([*inside, guard], 10)
        assert _alive(outside)  # only what started inside the block is the guard's
    finally:
        proc.kill()
        for p in [outside, *inside]:
            if _alive(p):
                psutil.Process(p).kill()


def test_a_vllm_engine_dies_with_its_killed_parent(base_dir):
    """A worker SIGKILLed while its teacher engine runs leaves no EngineCore behind."""
    proc, (guard, *family) = _start(_ENGINE, str(base_dir))
    engines = [p for p in family if p != guard]
    try:
        names = " ".join(psutil.Process(p).name() for p in engines)
        assert "VLLM" in names or "python" in names, names  # vLLM's EngineCore (and worker) processes
        assert engines
        proc.kill()
        proc.wait()
        assert not _gone_within(engines + [guard], 30)
    finally:
        proc.kill()
        for p in engines:
            if _alive(p):
                psutil.Process(p).kill()
