"""Character cards (Tavern V1, V2, V3; JSON or PNG with a `chara`/`ccv3` text chunk) to NPC fields."""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib

from service.errors import ApiError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MACROS = re.compile(r"\{\{\s*(char|user)\s*\}\}|<\s*(BOT|USER)\s*>", re.IGNORECASE)


def _fail(msg: str) -> ApiError:
    return ApiError(400, f"character card: {msg}", param="card", code="invalid_card")


def png_text_chunks(data: bytes) -> dict[str, str]:
    """A PNG's text chunks (tEXt, zTXt, iTXt), keyword -> text, read straight from the chunk list:
    the pixels are never decoded (a small PNG can inflate to hundreds of MB of them)."""
    if data[:8] != PNG_MAGIC:
        raise _fail("not a PNG")
    out, pos = {}, 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise _fail("the PNG is truncated")
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            break
        key, _, rest = body.partition(b"\0")
        try:
            if kind == b"tEXt":
                out[key.decode("latin-1")] = rest.decode("latin-1")
            elif kind == b"zTXt" and rest[:1] == b"\0":
                out[key.decode("latin-1")] = _inflate(rest[1:]).decode("latin-1")
            elif kind == b"iTXt":
                compressed, method, rest = rest[:1], rest[1:2], rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                if compressed == b"\1" and method == b"\0":
                    text = _inflate(text)
                out[key.decode("latin-1")] = text.decode("utf-8")
        except (UnicodeDecodeError, zlib.error):
            continue  # an unreadable text chunk is not the card's
    return out


def _inflate(raw: bytes, limit: int = 16 << 20) -> bytes:
    """zlib, bounded: a text chunk may not inflate past `limit` bytes."""
    d = zlib.decompressobj()
    out = d.decompress(raw, limit)
    if d.unconsumed_tail:
        raise _fail(f"a PNG text chunk inflates past {limit} bytes")
    return out


def _png_card(data: bytes) -> dict:
    """The card JSON from a PNG's text chunks (ccv3 preferred over chara)."""
    chunks = {k.lower(): v for k, v in png_text_chunks(data).items()}
    for key in ("ccv3", "chara"):
        if key in chunks:
            raw = chunks[key]
            try:
                decoded = base64.b64decode(raw + "=" * (-len(raw) % 4))
                return json.loads(decoded.decode("utf-8"))
            except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError):
                try:  # some tools store the JSON itself, not base64
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise _fail(f"the PNG's '{key}' chunk is not base64 JSON") from None
    raise _fail("the PNG has no 'chara' or 'ccv3' text chunk")


def parse_card(payload: dict | bytes | str) -> dict:
    """Card (dict, JSON text or PNG bytes) -> its fields as one flat dict, V2/V3 data preferred."""
    if isinstance(payload, (bytes, bytearray)):
        if bytes(payload[:8]) == PNG_MAGIC:
            payload = _png_card(bytes(payload))
        else:
            try:
                payload = json.loads(bytes(payload).decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise _fail("file is neither a PNG nor JSON") from None
    elif isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError:
            raise _fail("not valid JSON") from None
    if not isinstance(payload, dict):
        raise _fail("must be a JSON object")
    data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    # V1 fields sit at the top level; V2/V3 under data. Hybrid cards have both: data wins.
    card = {k: v for k, v in payload.items() if k != "data"}
    card.update({k: v for k, v in data.items() if v not in (None, "")})
    if not str(card.get("name") or "").strip():
        raise _fail("has no name")
    return card


def _text(v) -> str:
    return v.strip() if isinstance(v, str) else ""


def substitute(text: str, char: str, user: str = "User") -> str:
    def repl(m: re.Match) -> str:
        who = (m.group(1) or m.group(2)).lower()
        return char if who in ("char", "bot") else user

    return _MACROS.sub(repl, text).replace("\r\n", "\n")


def card_to_npc(card: dict, max_chars: int) -> dict:
    """Persona (description + personality + scenario), system prompt and greeting of a card."""
    name = _text(card.get("name"))[:64]
    char = _text(card.get("nickname")) or name  # {{char}}: the V3 nickname when there is one
    parts = [_text(card.get("description"))]
    if _text(card.get("personality")):
        parts.append(f"Personality: {_text(card.get('personality'))}")
    if _text(card.get("scenario")):
        parts.append(f"Scenario: {_text(card.get('scenario'))}")
    persona = substitute("\n\n".join(p for p in parts if p), char)
    if not persona.strip():
        raise _fail("has no description, personality or scenario to build a persona from")
    truncated = len(persona) > max_chars
    if truncated:
        cut = persona[:max_chars]
        persona = cut[: cut.rfind(" ")] if " " in cut[-200:] else cut
    return {
        "name": name,
        "persona": persona.strip(),
        "persona_truncated": truncated,
        "card_system_prompt": substitute(_text(card.get("system_prompt")), char) or None,
        "greeting": substitute(_text(card.get("first_mes")), char) or None,
    }


_V2_TEXT = ("description", "personality", "scenario", "first_mes", "mes_example", "creator_notes", "system_prompt",
            "post_history_instructions", "creator", "character_version")


def npc_to_card(rec: dict, card: dict | None) -> dict:
    """A Character Card V2 of this NPC: the card it came from (every field kept, V3 ones too), or
    one made of its persona."""
    card = dict(card or {})
    data = {k: card.get(k) if isinstance(card.get(k), str) else "" for k in _V2_TEXT}
    if not card:
        data.update(description=rec["persona"], first_mes=rec.get("greeting") or "",
                    system_prompt=rec.get("card_system_prompt") or "")
    data.update({k: v for k, v in card.items() if k not in data and k not in ("spec", "spec_version")})
    data["name"] = rec["name"]
    data["tags"] = card.get("tags") if isinstance(card.get("tags"), list) else []
    data["alternate_greetings"] = (card.get("alternate_greetings")
                                   if isinstance(card.get("alternate_greetings"), list) else [])
    ext = card.get("extensions") if isinstance(card.get("extensions"), dict) else {}
    data["extensions"] = {**ext, "npc_pruner": {"id": rec["id"], "sparsity": rec.get("sparsity"),
                                                "method": rec.get("method")}}
    if not isinstance(data.get("character_book"), dict):
        data.pop("character_book", None)
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def card_png(card: dict) -> bytes:
    """The card as a PNG with its JSON in a base64 `chara` tEXt chunk (a plain portrait-sized image)."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(card).encode("utf-8")).decode("ascii"))
    buf = io.BytesIO()
    Image.new("RGB", (256, 384), (52, 58, 74)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
