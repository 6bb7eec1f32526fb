"""Character-card PNGs: the card comes from the text chunks; the pixels are never decoded."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest

from service.errors import ApiError
from service.npcs.cards import PNG_MAGIC, parse_card, png_text_chunks

CARD = {"spec": "chara_card_v2", "data": {"name": "Ayla", "description": "A fox spirit who guards a shrine. é"}}
B64 = base64.b64encode(json.dumps(CARD).encode()).decode()


def _pil_png(add) -> bytes:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    add(info)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["tEXt", "zTXt", "iTXt", "iTXt-compressed"])
def test_every_text_chunk_kind_gives_the_card(kind):
    png = _pil_png({
        "tEXt": lambda i: i.add_text("chara", B64),
        "zTXt": lambda i: i.add_text("chara", B64, zip=True),
        "iTXt": lambda i: i.add_itxt("chara", B64),
        "iTXt-compressed": lambda i: i.add_itxt("chara", B64, zip=True),
    }[kind])
    assert png_text_chunks(png)["chara"] == B64
    assert parse_card(png)["name"] == "Ayla"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_decompression_bomb_is_not_decoded():
    """20000 x 20000 RGB (1.2 GB of pixels) in ~1 MB of IDAT, the card after it: read without inflating."""
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (64 << 20), 9)
    png = (PNG_MAGIC + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
           + _chunk(b"tEXt", b"chara\0" + B64.encode()) + _chunk(b"IEND", b""))
    assert len(png) < 2 << 20
    assert parse_card(png)["name"] == "Ayla"


def test_truncated_and_cardless_pngs_are_400():
    for png in (PNG_MAGIC + b"not really", _pil_png(lambda i: i.add_text("other", "{}"))):
        with pytest.raises(ApiError) as e:
            parse_card(png)
        assert e.value.status == 400


# -- whole cards on the real server ------------------------------------------------

SHARED_CARDS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared/data/cards"


@pytest.fixture(scope="module")
def seraphina(server):
    import httpx

    card = json.loads((SHARED_CARDS / "seraphina.st_default.v2.json").read_text())
    card["data"]["alternate_greetings"] = ["*{{char}} waves from the glade.* Welcome back, {{user}}."]
    card["data"]["post_history_instructions"] = "Answer as {{char}}, in two sentences at most."
    card["data"]["mes_example"] = "<START>\n{{user}}: Who are you?\n{{char}}: I guard these woods, traveller."
    card["data"]["nickname"] = "Sera"
    card["data"]["character_book"]["scan_depth"] = 1  # the greeting (which names the forest) is not scanned
    r = httpx.post(server.url + "/v1/npcs", json={"card": card, "sparsity": 0}, timeout=30)
    assert r.status_code == 202, r.text
    yield card, r.json()
    # the shared server's later tests count its engines: the dense-base one these NPCs used goes
    for n in httpx.get(server.url + "/v1/npcs", params={"limit": 1000}, timeout=30).json()["data"]:
        if n["method"] == "prompt":
            httpx.post(f"{server.url}/v1/npcs/{n['id']}/unload", timeout=120)


def _preview(server, npc_id, messages, **params):
    import httpx

    r = httpx.get(f"{server.url}/v1/npcs/{npc_id}/prompt", params={"messages": json.dumps(messages), **params},
                  timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_lore_reaches_the_prompt_only_when_keyed(server, seraphina, oai):
    card, npc = seraphina
    plain = [{"role": "user", "content": "Good morning. How did you sleep?"}]
    keyed = [{"role": "user", "content": "Tell me about the beasts that roam here."}]
    p0, p1 = _preview(server, npc["id"], plain), _preview(server, npc["id"], keyed)
    shadowfang = card["data"]["character_book"]["entries"][1]["content"][-60:]
    assert p0["lore"] == [] and shadowfang not in p0["prompt"]
    assert p1["lore"] == ["1"] and shadowfang in p1["prompt"]
    # the card's other parts: nickname for {{char}}, example dialogue, post-history instructions last
    assert "I guard these woods, traveller." in p0["prompt"]
    assert p0["messages"][-1] == {"role": "system", "content": "Answer as Sera, in two sentences at most."}
    assert p0["messages"][1] == {"role": "assistant", "content": npc["greeting"]}
    alt = _preview(server, npc["id"], plain, greeting_index=1)
    assert alt["messages"][1]["content"] == "*Sera waves from the glade.* Welcome back, User."

    used = [oai.chat.completions.create(model=npc["id"], messages=m, max_tokens=2, temperature=0).usage
            for m in (plain, keyed)]
    assert used[0].prompt_tokens == p0["prompt_tokens"] and used[1].prompt_tokens == p1["prompt_tokens"]
    assert used[1].prompt_tokens > used[0].prompt_tokens + 50

    import httpx
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": npc["id"], "messages": plain, "max_tokens": 2, "greeting_index": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "greeting_index"


@pytest.mark.slow
def test_card_exports_back_as_v2_json_and_png(server, seraphina):
    import httpx

    card, npc = seraphina
    r = httpx.get(f"{server.url}/v1/npcs/{npc['id']}/card", timeout=30)
    assert r.status_code == 200
    out = r.json()
    assert out["spec"] == "chara_card_v2" and out["data"]["name"] == npc["name"]
    for k in ("description", "first_mes", "character_book", "alternate_greetings", "mes_example",
              "post_history_instructions", "nickname", "tags"):
        assert out["data"][k] == card["data"][k], k
    assert out["data"]["extensions"]["npc_pruner"]["id"] == npc["id"]

    png = httpx.get(f"{server.url}/v1/npcs/{npc['id']}/card", headers={"Accept": "image/png"}, timeout=30)
    assert png.headers["content-type"] == "image/png" and png.content[:8] == PNG_MAGIC
    assert parse_card(png.content)["character_book"] == card["data"]["character_book"]

    # and it imports again as the same character
    again = httpx.post(server.url + "/v1/npcs", files={"card": ("s.png", png.content, "image/png")},
                       data={"sparsity": "0"}, timeout=30)
    assert again.status_code == 202, again.text
    assert again.json()["persona"] == npc["persona"]
    persona_only = server.create_npc("Plain Pete", "A grumpy ferryman who hates rain.", sparsity=0)
    plain = httpx.get(f"{server.url}/v1/npcs/{persona_only['id']}/card", timeout=30).json()
    assert plain["data"]["description"] == "A grumpy ferryman who hates rain." and plain["data"]["name"] == "Plain Pete"


# -- a card's lore and example dialogue in its pruning data -------------------------


def _seraphina_card() -> dict:
    card = parse_card((SHARED_CARDS / "seraphina.st_default.v2.json").read_bytes())
    card["mes_example"] = "<START>\n{{user}}: Who are you?\n{{char}}: I guard these woods, traveller."
    return card


def test_pruning_inputs_of_a_card_ask_about_its_lore_under_its_chat_prompt():
    from service.npcs.cards import card_to_npc
    from service.npcs.persona import system_prompt_of
    from service.npcs.prompt import MAX_LORE_QUESTIONS, pruning_inputs

    card = _seraphina_card()
    rec = card_to_npc(card, 8000)
    system, questions = pruning_inputs(rec, card)
    keys = [e["keys"][0] for e in card["character_book"]["entries"]]
    assert questions and len(questions) <= MAX_LORE_QUESTIONS
    assert all(any(k in q for q in questions) for k in keys)  # every entry's topic is asked about
    assert system_prompt_of(rec) in system
    from service.npcs import lore
    from service.npcs.cards import substitute

    # the lore those questions key, within the book's budget, as a chat asking them would get it
    chosen = lore.select(lore.book_of(card), ["\n".join(questions)], lambda t: len(t) // 4)
    assert chosen
    for e in lore.book_of(card).entries:
        assert (substitute(e.content, rec["name"], "User")[:60] in system) == (e in chosen), e.key
    assert "I guard these woods, traveller." in system  # the example dialogue, as every chat has it
    # an NPC without a card: its own system prompt, nothing asked
    assert pruning_inputs(rec, None) == (system_prompt_of(rec), [])


def test_extra_instructions_are_checked_and_always_in_the_data(base_dir):
    import torch

    from pruning import PruneError
    from pruning.methods.persona_pruner.data import _filter_inputs
    from pruning.model_io import load_model
    from pruning.options import resolve_options

    for bad in ("a question", [""], ["x" * 501], ["q"] * 65, [1]):
        with pytest.raises(PruneError, match="extra_instructions"):
            resolve_options({"extra_instructions": bad})
    model, _ = load_model(base_dir, dtype=torch.float32)
    lore = ["What can you tell me about eldoria?", "What does shadowfang mean to you?"]
    pool, anchors, _, _ = _filter_inputs(model, resolve_options({"profile": "fast", "extra_instructions": lore}))
    assert anchors == lore and not set(lore) & set(pool)
