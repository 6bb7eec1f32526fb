"""How an NPC's persona becomes the system prompt it chats under."""

from __future__ import annotations


def system_prompt(name: str, persona: str, card_system_prompt: str | None = None) -> str:
    default = (f"You are {name}. {persona.strip()}\n"
               f"Stay in character as {name} in every reply, speak in the first person, "
               "and never say that you are an AI or a language model.")
    if card_system_prompt:
        # a card's own system prompt leads; {{original}} stands for ours (SillyTavern convention)
        if "{{original}}" in card_system_prompt:
            return card_system_prompt.replace("{{original}}", default)
        return f"{card_system_prompt}\n\n{default}"
    return default


def system_prompt_of(rec: dict) -> str:
    """The NPC's system prompt: built once when the NPC is created and kept on its record (records
    made before it was kept there are built the same way)."""
    if rec.get("system_prompt"):
        return rec["system_prompt"]
    return system_prompt(rec["name"], rec["persona"], rec.get("card_system_prompt"))
