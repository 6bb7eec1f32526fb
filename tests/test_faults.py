"""The fault matrix in CI: one fault of each kind (`python -m benchmarks.faults` runs ten of each).

Real faults on real parts: SIGKILLed workers (held in the stage by NPC_FAULT_HOLD so that the kill
lands there), a SIGKILLed and restarted Redis, a real full disk (a tmpfs; mounting needs root, as CI
and these machines have)."""

from __future__ import annotations

import os

import pytest

from benchmarks.faults import KINDS, Rig, run_case

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rig(tmp_path_factory, models_dir):
    if os.geteuid() != 0:
        pytest.fail("the disk-full case mounts a tmpfs: run the tests as root") if os.environ.get("CI") \
            else pytest.skip("needs root (tmpfs)")
    r = Rig(tmp_path_factory.mktemp("faults"), models_dir)
    yield r
    r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_fault_loses_and_duplicates_nothing(rig, kind):
    case = run_case(rig, kind, 0)
    print(case)
    assert case["status"] == "ready", case
    assert (case["lost"], case["duplicated"], case["leftover"]) == (0, 0, 0), case
    if kind != "redis-restart":  # the attempt that broke, then the one that finished
        assert case["attempts"] == 2, case
    else:  # the worker rides out a Redis restart: its attempt goes on
        assert case["attempts"] == 1, case
    assert not case["error"], case  # a ready NPC carries no error of an earlier attempt
