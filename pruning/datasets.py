"""Shipped data (calibration prompts, instruction pool, reference personas) and user files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pruning import PruneError


def _read_jsonl_text(text: str, source: str) -> list:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PruneError(f"{source}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _shipped(name: str) -> list:
    text = resources.files("pruning.data").joinpath(name).read_text(encoding="utf-8")
    return _read_jsonl_text(text, name)


def load_instructions(path: str | Path | None = None) -> list[str]:
    """Alpaca-style instructions (JSON list or JSONL), `input` appended when present."""
    if path is None:
        rows = _shipped("generic_instructions.jsonl")
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PruneError(f"cannot read instruction pool {p}: {e.strerror}") from None
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise PruneError(f"{p}: not valid JSON ({e.msg})") from None
        else:
            rows = _read_jsonl_text(text, str(p))
    out = []
    for r in rows:
        if isinstance(r, str):
            out.append(r)
        elif isinstance(r, dict) and r.get("instruction"):
            extra = (r.get("input") or "").strip()
            # the Alpaca prompt's own layout, which users' Alpaca-style questions also arrive in
            out.append(r["instruction"] + (f"\n\n### Input:\n{extra}" if extra else ""))
    if not out:
        raise PruneError(f"instruction pool {path or 'shipped'} holds no instructions")
    return out


def calibration_prompts(n: int | None = None) -> list[str]:
    rows = _shipped("calibration_prompts.jsonl")
    prompts = [r["instruction"] if isinstance(r, dict) else r for r in rows]
    return prompts[:n] if n else prompts


def load_reference_personas(path: str | Path | None = None) -> list[str]:
    if path is None:
        rows = _shipped("reference_personas.jsonl")
    else:
        try:
            rows = _read_jsonl_text(Path(path).read_text(encoding="utf-8"), str(path))
        except OSError as e:
            raise PruneError(f"cannot read reference personas {path}: {e.strerror}") from None
    personas = [r if isinstance(r, str) else r.get("persona", "") for r in rows]
    personas = [p for p in personas if p]
    if not personas:
        raise PruneError(f"no reference personas in {path or 'shipped'}")
    return personas


def read_persona_file(persona_file: Path) -> tuple[str, str | None]:
    """(persona, chat system prompt or None) from a text file or an eval-format JSON file."""
    try:
        text = persona_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PruneError(f"cannot read persona file {persona_file}: {getattr(e, 'strerror', None) or e}") from None
    if persona_file.suffix.lower() == ".json":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise PruneError(f"persona file {persona_file} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise PruneError(f"persona file {persona_file}: expected a JSON object")
        desc = d.get("persona_description") or d.get("persona") or d.get("description") or ""
        system = d.get("system_prompt") if isinstance(d.get("system_prompt"), str) else None
        return (desc or system or "").strip(), (system.strip() or None) if system else None
    return text, None
