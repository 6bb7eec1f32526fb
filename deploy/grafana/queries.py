"""PromQL queries of the Grafana dashboard, ready to send to Prometheus.

``dashboard_queries("blacksmith")`` loads ``dashboards/npc.json`` next to this
file and returns every panel target's ``expr``, in panel order, with the
dashboard variable ``$npc`` replaced by the given NPC name, the way Grafana
would for a single selected value. Tests run these against a real Prometheus
to check that every panel shows data.

This file has no package ``__init__``; load it by path, e.g.::

    import importlib.util, pathlib
    spec = importlib.util.spec_from_file_location(
        "npc_dashboard_queries", pathlib.Path("deploy/grafana/queries.py"))
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    mod.dashboard_queries("blacksmith")

(or ``from deploy.grafana.queries import dashboard_queries`` with the
repository root on ``sys.path``: ``deploy`` works as a namespace package).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

DASHBOARD_PATH = Path(__file__).resolve().parent / "dashboards" / "npc.json"

# $npc, ${npc}, ${npc:raw}/${npc:regex}/... and the legacy [[npc]] form.
_VAR_RE = re.compile(r"\$\{npc(?::[A-Za-z]+)?\}|\[\[npc\]\]|\$npc\b")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_:\-]*$")


def load_dashboard(path: str | Path | None = None) -> dict[str, Any]:
    with open(path or DASHBOARD_PATH, encoding="utf-8") as f:
        return json.load(f)


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", []) or []


def _regex_value(npc: str) -> str:
    """The value as it goes inside a PromQL regex matcher ``=~"..."``.

    Plain names go in as they are. Otherwise escape regex metacharacters
    (as Grafana does) and then the backslashes for the PromQL string literal.
    """
    if npc in (".*", "$__all"):  # Grafana's "All" (allValue ".*")
        return ".*"
    if _PLAIN_NAME.match(npc):
        return npc
    escaped = re.escape(npc)
    return escaped.replace("\\", "\\\\").replace('"', '\\"')


def substitute(expr: str, npc: str) -> str:
    value = _regex_value(npc)
    return _VAR_RE.sub(lambda _m: value, expr)


def dashboard_queries(npc: str, path: str | Path | None = None) -> list[str]:
    """Every panel expr of the dashboard, with ``$npc`` set to ``npc``."""
    dashboard = load_dashboard(path)
    queries: list[str] = []
    for panel in iter_panels(dashboard):
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets", []) or []:
            expr = target.get("expr")
            if expr and not target.get("hide"):
                queries.append(substitute(expr, npc))
    return queries


if __name__ == "__main__":  # pragma: no cover
    import sys

    for q in dashboard_queries(sys.argv[1] if len(sys.argv) > 1 else ".*"):
        print(q)
