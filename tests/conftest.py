"""Shared fixtures: one real `npc serve` (embedded Redis, worker, vLLM) for the whole session."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

from service.devserver import DEFAULT_BASE, Server, default_models_dir, free_port  # noqa: F401  (tests import them)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def require(what: str) -> None:
    """A test's dependency is missing: with CI=true that fails the run (CI must not go green by
    skipping what it was meant to check); elsewhere the test is skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"{what}; with CI=true a missing test dependency is a failure", pytrace=False)
    pytest.skip(what)


def require_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        require(f"python module {name!r} is not installed")


def pytest_configure(config) -> None:
    # the card, schema and eval tests read ../shared: without it they would quietly not exist
    if os.environ.get("CI") and not (SHARED / "data").is_dir():
        raise pytest.UsageError(f"CI=true but {SHARED / 'data'} is missing: the tests that read it cannot run")


PERSONA_A = ("A grumpy old pirate captain named Rook who loves rum, hates the navy, "
             "and speaks in salty sea slang about storms, treasure and his ship.")
PERSONA_B = ("A cheerful village baker who wakes before dawn, adores sourdough and cinnamon buns, "
             "and gives everyone gentle advice with a baking metaphor.")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    d = default_models_dir()
    if not (d / DEFAULT_BASE / "config.json").is_file():
        pytest.fail(f"default model missing in {d}: run `make setup` (or `npc models pull`)")
    return d


@pytest.fixture(scope="session")
def base_dir(models_dir) -> Path:
    return models_dir / DEFAULT_BASE


@pytest.fixture(scope="session")
def openai_schemas() -> dict:
    return json.loads((SHARED / "data/openai/openai_chat_schemas.json").read_text())


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir):
    srv = Server(tmp_path_factory.mktemp("npc-data"), models_dir).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def npc_a(server) -> dict:
    rec = server.create_npc("Captain Rook", PERSONA_A, sparsity=0.25)
    return server.wait_ready(rec["id"])


@pytest.fixture(scope="session")
def npc_b(server, npc_a) -> dict:
    rec = server.create_npc("Bea the Baker", PERSONA_B, sparsity=0.25, method="activation-prompt")
    return server.wait_ready(rec["id"])


@pytest.fixture(scope="session")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
