"""The shared pruned core (pruning/core.py): a smaller base that NPCs are pruned within."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PERSONA_A
from pruning import PruneError
from pruning.checkpoint import materialize, scales_from_json
from pruning.core import build_core, dense_of, read_core
from pruning.manifest import Manifest, checkpoint_sha256
from pruning.model_io import load_model
from pruning.prefix_forward import channel_mask, kept_masks
from pruning.prune import prune
from service.basemodels import npc_base


@pytest.fixture(scope="module")
def core(tmp_path_factory, base_dir):
    out = build_core(base_dir, 0.25, tmp_path_factory.mktemp("core") / "smollm2-core25")
    return read_core(out)


def test_the_core_is_the_dense_model_without_its_dropped_channels(core, base_dir):
    assert core.sparsity == 0.25 and core.dense_dir.resolve() == Path(base_dir).resolve()
    assert Manifest.read(core.core_dir)["core"]["source"] == "shipped"
    assert dense_of(core.core_dir) == core.dense_dir and dense_of(base_dir) == Path(base_dir)
    cfg = json.loads((core.core_dir / "config.json").read_text())
    assert cfg["intermediate_size"] == len(core.kept[0]) == 1152
    dense, tok = load_model(base_dir)
    small, _ = load_model(core.core_dir)
    ids = tok("Tell me about the sea and your ship.", return_tensors="pt").input_ids
    with torch.no_grad():
        with channel_mask(dense, kept_masks(dense, [torch.tensor(r) for r in core.kept])):
            want = dense(ids).logits
        got = small(ids).logits
    assert (got - want).abs().max() < 1e-3
    # every host that builds it gets the same bytes: NPC manifests name the core by its sha256
    again = build_core(base_dir, 0.25, core.core_dir.parent / "again")
    assert checkpoint_sha256(again) == core.sha256
    # and the core is not the dense model: the dropped channels mattered
    with torch.no_grad():
        assert (dense(ids).logits - got).abs().max() > 0.1


def _check_within(core, out: Path) -> None:
    """`out` keeps channels of the core only, its compact form indexes the core, and rebuilding it
    from the core's weights gives its own weights exactly."""
    m = Manifest.read(out)
    assert m.base_model == str(core.core_dir.resolve()) and m.base_sha256 == core.sha256
    assert m.data["within_core"]["dense_sha256"] == core.dense_sha256
    assert read_core(out) is None  # an NPC of a core is not a core itself
    kept = m.kept_indices
    assert all(0 <= i < len(core.kept[0]) for row in kept for i in row)
    assert all(row == sorted(set(row)) for row in kept)
    rebuilt = materialize(core.core_dir, [torch.tensor(r) for r in kept], scales=scales_from_json(m.channel_scales))
    own = {}
    for f in out.glob("*.safetensors"):
        own.update(load_file(f))
    for name, t in own.items():
        assert torch.equal(rebuilt[name].to(t.dtype), t), name


def test_an_npc_within_the_core_keeps_a_subset_and_indexes_the_core(core, tmp_path):
    out = tmp_path / "npc"
    prune(core.core_dir, PERSONA_A, 0.5, "activation-prompt", out)
    _check_within(core, out)
    assert len(Manifest.read(out).kept_indices[0]) == 768
    # the same method on the dense base picks channels outside the core: the constraint did something
    free = tmp_path / "free"
    prune(core.dense_dir, PERSONA_A, 0.5, "activation-prompt", free)
    outside = [set(r) - set(c) for r, c in zip(Manifest.read(free).kept_indices, core.kept)]
    assert sum(map(len, outside)) > 0


def test_persona_pruner_learns_within_the_core(core, tmp_path):
    out = tmp_path / "pp"
    prune(core.core_dir, PERSONA_A, 0.5, "persona-pruner", out, options={"profile": "fast"},
          cache_dir=tmp_path / "cache")
    _check_within(core, out)
    assert Manifest.read(out).channel_scales is not None  # learned on the dense model, applied over the core


def test_an_npc_below_the_core_or_depth_pruned_is_refused(core, tmp_path):
    with pytest.raises(PruneError, match="below its base's core"):
        prune(core.core_dir, PERSONA_A, 0.1, "activation", tmp_path / "x")
    with pytest.raises(PruneError, match="within a core"):
        prune(core.core_dir, PERSONA_A, 0.5, "depth", tmp_path / "y")
    with pytest.raises(PruneError, match="core already"):
        build_core(core.core_dir, 0.5, tmp_path / "z")


def test_which_base_an_npc_is_made_of(tmp_path):
    base, models = tmp_path / "m" / "smollm2", tmp_path / "m"
    core = models / "smollm2-core25"
    assert npc_base(base, models, 0.25, 0.0, "persona-pruner", {}) == (base, True)   # prompt-only: dense
    assert npc_base(base, models, 0.25, 0.1, "persona-pruner", {}) == (base, False)  # below the core
    assert npc_base(base, models, 0.25, 0.25, "persona-pruner", {}) == (core, True)  # the core + prompt
    assert npc_base(base, models, 0.25, 0.5, "persona-pruner", {}) == (core, False)
    assert npc_base(base, models, 0.25, 0.5, "depth", {}) == (base, False)
    assert npc_base(base, models, 0.25, 0.5, "taylor", {"recover": True}) == (base, False)
    assert npc_base(base, models, 0.0, 0.5, "persona-pruner", {}) == (base, False)   # no core


def test_the_shipped_core_matches_its_base(base_dir):
    sha = checkpoint_sha256(base_dir)
    p = Path(__file__).resolve().parents[1] / "pruning" / "data" / "cores" / f"{sha[:16]}-c25.json"
    kept = json.loads(p.read_text())["kept_indices"]
    assert len(kept) == 30 and all(len(set(r)) == 1152 and max(r) < 1536 for r in kept)


# -- the service on a core -------------------------------------------------------------------


@pytest.fixture(scope="module")
def core_server(tmp_path_factory, models_dir):
    import os
    import shutil

    from conftest import DEFAULT_BASE, Server

    tmp = tmp_path_factory.mktemp("npc-core")
    models = tmp / "models"
    shutil.copytree(models_dir / DEFAULT_BASE, models / DEFAULT_BASE, copy_function=os.link)
    srv = Server(tmp / "data", models, extra_env={"NPC_CORE_SPARSITY": "0.25", "NPC_MIXED_BATCHES": "1",
                                                  "NPC_INSTANT_NPCS": "1"}).start(timeout=300)
    yield srv, models
    srv.stop()


@pytest.mark.slow
def test_a_server_on_a_core_serves_its_npcs_from_one_smaller_engine(core_server):
    import httpx

    from conftest import DEFAULT_BASE
    from test_mixed import _chat, _engines, assert_serves_its_checkpoint

    srv, models = core_server
    core_dir = models / f"{DEFAULT_BASE}-core25"
    assert read_core(core_dir) is not None  # built at start from the shipped core
    at_core = srv.create_npc("Rook", PERSONA_A, sparsity=0.25)
    assert at_core["status"] == "ready" and at_core["method"] == "prompt"  # the core with its prompt: no job
    npc = srv.create_npc("Rook", PERSONA_A, sparsity=0.5, method="activation-prompt")
    below = srv.create_npc("Rook", PERSONA_A, sparsity=0.0)
    srv.wait_ready(npc["id"])
    base_of = {}
    for n in (at_core, npc, below):
        r = _chat(srv, n["id"], "Who are you?")
        assert r.status_code == 200, r.text
        base_of[n["id"]] = r.headers["x-npc-serving"]
    assert base_of == {at_core["id"]: "prompt", npc["id"]: "pruned", below["id"]: "prompt"}
    shapes = {(e["mode"], e["shape"]["intermediate_size"]) for e in _engines(srv)}
    # the core's NPCs share one engine of the core's size; the prompt-only NPC at 0 runs the dense base
    assert shapes == {("mixed", 1152), ("mixed", 1536)}, shapes
    ck = Manifest.read(srv.data_dir / "npcs" / npc["id"])
    assert ck.base_sha256 == checkpoint_sha256(core_dir)
    assert_serves_its_checkpoint(srv, npc["id"])
    r = httpx.post(srv.url + "/v1/npcs", json={"name": "x", "persona": PERSONA_A, "sparsity": 0.95})
    assert r.status_code in (400, 422)
