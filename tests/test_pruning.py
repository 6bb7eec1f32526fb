"""The pruning library on the real default model: scores, top-k, export, compact form, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning import PruneError
from pruning.checkpoint import (export_checkpoint, keep_count, kept_from_json, materialize, scales_from_json,
                                scales_to_json, select_kept, zero_dropped)
from pruning.datasets import calibration_prompts, load_instructions, load_reference_personas
from pruning.manifest import Manifest
from pruning.methods import METHODS, LayerScores, PruneContext, get_method
from pruning.model_io import load_model
from pruning.prune import check_args
from tests.conftest import PERSONA_A

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["Tell me about your favourite place.", "How do I boil an egg?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def dense(base_dir):
    return load_model(base_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def activation_kept(dense):
    model, tok = dense
    scores = get_method("activation")(model, tok, PruneContext(persona=PERSONA_A, calibration=calibration_prompts(8)))
    return select_kept(scores, keep_count(model.config.intermediate_size, 0.25))


def test_shipped_data():
    assert len(calibration_prompts()) >= 32
    assert len(load_instructions()) >= 500
    rows = [json.loads(x) for x in (ROOT / "pruning/data/generic_instructions.jsonl").read_text().splitlines() if x]
    assert len({r["kind"] for r in rows}) >= 20
    assert len({r["instruction"] for r in rows}) == len(rows)
    with_input = next(r for r in rows if r["input"])  # shown to the model in the Alpaca layout
    assert f"{with_input['instruction']}\n\n### Input:\n{with_input['input']}" in load_instructions()
    assert len(load_reference_personas()) >= 10


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_no_eval_question_is_in_the_shipped_data():
    """Quality is measured on questions the method never trained on: no pool instruction may be an
    eval question or a close paraphrase (word-set Jaccard >= 0.65; three once were verbatim)."""
    import glob

    questions = [q for f in [*glob.glob(str(ROOT / "benchmarks/unseen_eval/*.json")),
                             *glob.glob(str(ROOT.parent / "shared/data/eval/*.json"))]
                 for q in json.loads(Path(f).read_text())["questions"]]
    assert len(questions) >= 200  # the unseen set, and the shared one where it is checked out
    evq = [_words(q) for q in questions]
    close = []
    for text in load_instructions():
        a = _words(text)
        close += [(text, q) for q, b in zip(questions, evq) if len(a & b) / len(a | b) >= 0.65]
    assert close == []


def test_keep_count_and_topk_exact():
    assert keep_count(1536, 0.25) == 1152
    assert keep_count(1536, 0.5) == 768
    scores = [torch.randn(1536, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    kept = select_kept(scores, 1152)
    for s, k in zip(scores, kept):
        assert len(k) == 1152 and len(set(k.tolist())) == 1152
        assert torch.all(k[1:] > k[:-1])  # sorted: channel order preserved
        assert s[k].min() >= s[torch.tensor(sorted(set(range(1536)) - set(k.tolist())))].max()


def test_channel_scales_json_is_short_and_exact():
    g = torch.Generator().manual_seed(0)
    scales = [1 + 0.1 * torch.randn(2048, generator=g) for _ in range(4)]
    scales.append(torch.tensor([0.0, -0.0, 1e-30, 3.4e38, 1 / 3, 0.1]))
    rows = scales_to_json(scales)
    assert all(torch.equal(a, b) for a, b in zip(scales, scales_from_json(json.loads(json.dumps(rows)))))
    # a float32 needs at most 9 significant digits, not a double's 17
    assert len(json.dumps(rows)) < 0.6 * len(json.dumps([[float(x) for x in s] for s in scales]))


def test_every_method_scores_every_channel(dense):
    """Every cheap method; the two on the persona's synthetic set have their own tests
    (tests/test_persona_pruner.py)."""
    model, tok = dense
    ctx = PruneContext(persona=PERSONA_A, calibration=calibration_prompts(2))
    assert {"random", "magnitude", "activation", "taylor", "depth", "activation-prompt", "activation-persona",
            "persona-pruner"} <= set(METHODS)
    for name in sorted(set(METHODS) - {"persona-pruner", "activation-persona"}):
        scores = get_method(name)(model, tok, ctx)
        assert len(scores) == model.config.num_hidden_layers
        if isinstance(scores, LayerScores):  # depth: one score per block
            assert all(0 <= s < 2 for s in scores)
            continue
        assert all(s.shape == (model.config.intermediate_size,) and torch.isfinite(s).all() for s in scores)
    assert all(p.grad is None for p in model.parameters())  # taylor leaves no gradients behind


def test_taylor_is_first_order_importance(dense):
    model, tok = dense
    ctx = PruneContext(persona=PERSONA_A, calibration=calibration_prompts(4))
    taylor = get_method("taylor")(model, tok, ctx)
    magnitude = get_method("magnitude")(model, tok, ctx)
    k = keep_count(1536, 0.25)
    assert all((s >= 0).all() and s.sum() > 0 for s in taylor)
    # a different ranking from weight norms alone (it sees the data)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(select_kept(taylor, k),
                                                                        select_kept(magnitude, k)))
    assert overlap < 0.95 * k * len(taylor)


def test_depth_drops_blocks_matching_parameters(base_dir, tmp_path, dense):
    from pruning.checkpoint import drop_layers_inplace
    from pruning.methods import block_param_counts, blocks_to_drop
    from pruning.prune import prune

    model, tok = dense
    n = blocks_to_drop(model, 0.25)
    block, ffn = block_param_counts(model)
    # the nearest whole number of blocks to a quarter of all FFN parameters
    assert abs(n * block - 0.25 * 30 * ffn) <= block / 2
    summary = prune(base_dir, PERSONA_A, 0.25, "depth", tmp_path / "d", n_calibration=4)
    dropped = summary["dropped_layers"]
    assert len(dropped) == n
    manifest = Manifest.read(tmp_path / "d")
    assert manifest["dropped_layers"] == dropped and manifest["num_hidden_layers"] == 30 - n
    pruned, _ = load_model(tmp_path / "d", dtype=torch.float32)
    assert len(pruned.model.layers) == 30 - n
    # the export computes what the dense model computes without those blocks
    ref, _ = load_model(base_dir, dtype=torch.float32)
    drop_layers_inplace(ref, dropped)
    for e, g in zip(_logits(ref, tok), _logits(pruned, tok)):
        assert (e - g).abs().max() / e.abs().max() < 2e-2  # the export is bf16
    # and the compact form (dropped block ids) rebuilds the exported tensors
    from safetensors.torch import load_file

    rebuilt = materialize(base_dir, None, dropped)
    exported = load_file(tmp_path / "d" / "model.safetensors")
    assert set(rebuilt) == set(exported)
    assert all(torch.equal(rebuilt[k], exported[k]) for k in exported)


def test_random_is_seeded(dense):
    model, tok = dense
    a = get_method("random")(model, tok, PruneContext(persona="x", seed=3))
    b = get_method("random")(model, tok, PruneContext(persona="x", seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _logits(model, tok):
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
            out.append(model(ids).logits.float())
    return out


def test_export_equals_masked_dense(base_dir, tmp_path, activation_kept):
    """The exported (smaller) checkpoint computes what the dense model computes with dropped channels zeroed."""
    kept = activation_kept
    masked, tok = load_model(base_dir, dtype=torch.float32)
    zero_dropped(masked, kept)
    expected = _logits(masked, tok)

    model, tok = load_model(base_dir, dtype=torch.float32)
    out = export_checkpoint(model, tok, kept, tmp_path / "npc", base_dir=base_dir, method="activation",
                            sparsity=0.25, persona=PERSONA_A, dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 1152
    pruned, _ = load_model(out, dtype=torch.float32)
    assert pruned.model.layers[0].mlp.gate_proj.weight.shape == (1152, 576)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (576, 1152)
    for e, g in zip(expected, _logits(pruned, tok)):
        rel = (e - g).abs().max() / e.abs().max()
        assert rel < 1e-4, rel

    manifest = Manifest.read(out)
    for key in ("base_model", "base_sha256", "method", "sparsity", "kept_indices", "persona", "created"):
        assert key in manifest
    assert [k.tolist() for k in kept_from_json(manifest["kept_indices"])] == [k.tolist() for k in kept]

    # compact form: kept indices + base checkpoint give the identical weights
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    rebuilt = materialize(base_dir, kept_from_json(manifest["kept_indices"]))
    for name, t in exported.items():
        assert torch.equal(rebuilt[name], t), name


def test_bad_arguments():
    with pytest.raises(PruneError, match="empty"):
        check_args("  ", 0.25, "activation")
    for s in (0, -0.1, 0.95, 1.0):
        with pytest.raises(PruneError, match="sparsity"):
            check_args("a persona", s, "activation")
    with pytest.raises(PruneError, match="unknown method"):
        check_args("a persona", 0.25, "nope")


def _npc(*args, env=None):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_prune_bad_input_leaves_nothing(tmp_path, base_dir):
    out = tmp_path / "out"
    for extra in (["--sparsity", "0.95"], ["--method", "bogus"], ["--persona", " "]):
        args = ["prune", "--base", str(base_dir), "--persona", "a pirate", "--out", str(out), *extra]
        r = _npc(*args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists()
    r = _npc("prune", "--base", str(tmp_path / "missing"), "--persona", "p", "--out", str(out))
    assert r.returncode == 2 and "npc models pull" in r.stderr


def test_cli_prune_exports(tmp_path, base_dir):
    """Without --base, `npc prune` prunes the server's default base (NPC_BASE_MODEL)."""
    out = tmp_path / "npc"
    r = _npc("prune", "--persona", PERSONA_A, "--sparsity", "0.5",
             "--method", "magnitude", "--out", str(out))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["kept_per_layer"] == 768
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 768
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_chat_ids_are_the_templates_text_tokenised(base_dir):
    """`pruning.chat` tokenises through apply_chat_template(tokenize=True); the call sites it
    replaced rendered the text and tokenised it without special tokens: the same ids."""
    from transformers import AutoTokenizer

    from pruning.chat import chat_ids, messages, prompt_ids

    tok = AutoTokenizer.from_pretrained(base_dir)
    convs = [messages("Who are you?"), messages("Who are you?", PERSONA_A), messages("", PERSONA_A),
             messages("Why?", PERSONA_A, [("Hi", "Arr."), ("Where?", "At sea.")]),
             messages("Summarise: " + "words " * 300, "A very long persona. " * 100)]
    for msgs in convs:
        for gen in (True, False):
            text = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert chat_ids(tok, msgs, add_generation_prompt=gen) == list(
                tok(text, add_special_tokens=False)["input_ids"])
    # the cap is on the user's part, never on the system prompt
    system = chat_ids(tok, messages("x", PERSONA_A)[:1], add_generation_prompt=False)
    capped = prompt_ids(tok, "Summarise: " + "words " * 300, PERSONA_A, max_user_tokens=5)
    assert capped[:len(system)] == system and len(capped) == len(system) + 5
    assert prompt_ids(tok, "Hi", PERSONA_A) == chat_ids(tok, messages("Hi", PERSONA_A))


def test_method_names_are_the_registry():
    from pruning.options import METHOD_NAMES

    assert set(METHODS) == set(METHOD_NAMES)


def test_options_manifest_and_chat_import_without_torch():
    code = ("import sys; import pruning.options, pruning.manifest, pruning.files, pruning.chat, pruning.model_io, "
            "pruning.engine_args, pruning.methods; assert 'torch' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
