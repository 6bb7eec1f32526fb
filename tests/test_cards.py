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
