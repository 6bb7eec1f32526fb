"""How an NPC's persona becomes the system prompt it chats under."""

from __future__ import annotations


def system_prompt(name: str, persona: str) -> str:
    return (f"You are {name}. {persona.strip()}\n"
            f"Stay in character as {name} in every reply, speak in the first person, "
            "and never say that you are an AI or a language model.")
