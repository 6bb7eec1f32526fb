"""Runs inside each vLLM worker: seeded sampling that survives a partial prefill on CPU.

A request with a `seed` and a temperature gets a generator of its own. When its prompt is
prefilled over several steps (chunked prefill: a step holds at most max_num_batched_tokens, 2048
here, so concurrent long prompts split), vLLM discards the token sampled at a partial step and
rewinds that generator by its offset. A CPU generator has no offset ("CPU Generator does not use
offset"), so the rewind raised and killed the engine with every request on it. On CPU the
discarded step's draw is instead left in the generator's stream: the request still samples from
its own seeded generator (the same output for the same seed and the same chunking), and nothing
dies.
"""

from __future__ import annotations


def patch() -> None:
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig = GPUModelRunner._bookkeeping_sync
    if getattr(orig, "npc_cpu_seeds", False):
        return

    def bookkeeping(self, *args, **kw):
        if getattr(self.device, "type", "cpu") != "cpu":
            return orig(self, *args, **kw)
        gens = self.input_batch.generators
        n = self.input_batch.num_reqs
        held = {}
        for i in np.nonzero(self.discard_request_mask.np[:n])[0]:
            if int(i) in gens:
                held[int(i)] = gens.pop(int(i))
        try:
            return orig(self, *args, **kw)
        finally:
            gens.update(held)

    bookkeeping.npc_cpu_seeds = True
    GPUModelRunner._bookkeeping_sync = bookkeeping
