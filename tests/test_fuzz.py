"""Schemathesis fuzzes the app's own OpenAPI document on a live server: no 5xx, ever."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, models_dir):
    # no worker: fuzzed creations only queue jobs instead of pruning hundreds of NPCs
    srv = Server(tmp_path_factory.mktemp("fuzz"), models_dir, {"NPC_PREWARM": "false", "NPC_LOAD_WAIT_S": "5"},
                 args=["--workers", "0"]).start()
    yield srv
    srv.stop()


def test_schemathesis_no_server_errors(fuzz_server, tmp_path):
    st = Path(sys.executable).parent / "st"
    assert st.exists() or shutil.which("st"), "schemathesis is not installed"
    r = subprocess.run(
        [str(st), "run", fuzz_server.url + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "40", "--workers", "1", "--no-color", "--seed", "1",
         "--request-timeout", "30",
         # an NPC's event stream rightly stays open while its job is queued (no worker here); a
         # session's messages and a scene's turns generate for as long as the max_tokens drawn
         # (tests/test_sessions.py and tests/test_scenes.py check their inputs)
         "--exclude-path-regex", "/events$|/messages$|/turns$"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    out = r.stdout + r.stderr
    (Path(fuzz_server.data_dir) / "schemathesis.txt").write_text(out)
    assert r.returncode == 0, out[-5000:]
    m = re.search(r"(\d+) generated", out) or re.search(r"(\d+) test cases", out)
    print("\n" + "\n".join(out.strip().splitlines()[-12:]))
    assert m and int(m.group(1)) >= 100, out[-3000:]
