"""The page at `/` in a real headless Chromium (Debian's, driven by Playwright): create a
prompt-only NPC, chat once, see the reply."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import require, require_module

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_page_creates_an_npc_and_chats(server, tmp_path):
    require_module("playwright")
    if not Path(CHROMIUM).exists():
        require("Debian's chromium (make test-system-deps installs it)")
    from playwright.sync_api import expect, sync_playwright

    assert httpx.get(server.url + "/static/app.js").status_code == 200
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#npc-name", "Page Pia")
            page.fill("#npc-persona", "A cheerful lighthouse keeper who talks about ships and storms.")
            page.select_option("#npc-sparsity", "0")
            page.click("#create-btn")
            expect(page.locator("#npc-list li", has_text="Page Pia")).to_be_visible(timeout=30_000)
            expect(page.locator("#d-name")).to_have_text("Page Pia")
            expect(page.locator("#d-status")).to_contain_text("ready")
            page.fill("#chat-input", "Hello! What do you see tonight?")
            page.click("#chat-send")
            reply = page.locator(".msg.assistant.done").last
            expect(reply).to_be_visible(timeout=300_000)
            assert reply.inner_text().strip()
            expect(page.locator("#chat-speed")).to_contain_text("tokens")
            assert page.locator("#chat-error").inner_text() == ""
            page.screenshot(path=str(tmp_path / "page.png"))
            # the tab keeps its conversation across a reload; another tab starts its own
            page.reload()
            page.locator("#npc-list li", has_text="Page Pia").click()
            expect(page.locator(".msg.user", has_text="What do you see tonight?")).to_be_visible(timeout=30_000)
            other = browser.new_page()
            other.goto(server.url + "/")
            other.locator("#npc-list li", has_text="Page Pia").click()
            expect(other.locator("#d-name")).to_have_text("Page Pia")
            assert other.locator(".msg.user").count() == 0
            assert not errors, errors
        finally:
            browser.close()
    npcs = httpx.get(server.url + "/v1/npcs", params={"limit": 1000}).json()["data"]
    pia = [n for n in npcs if n["name"] == "Page Pia"]
    assert len(pia) == 1 and pia[0]["method"] == "prompt"
    sessions = httpx.get(f"{server.url}/v1/npcs/{pia[0]['id']}/sessions").json()["data"]
    assert len(sessions) == 1
