"""Sessions and scenes: conversations the server keeps."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.protocol.openai import ResponseFormat


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str | None = Field(None, max_length=64, description="the player's name ({{user}} in the card)")
    greeting_index: int | None = Field(None, ge=0, description="which of the card's greetings opens it")
    context_tokens: int | None = Field(None, ge=256, description="the prompt and reply budget; older turns are "
                                       "folded into the session's summary to stay within it (default: the context)")


class SceneCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    npcs: list[str] = Field(..., min_length=2, max_length=8, description="the NPCs in the scene (ids)")
    setting: str = Field(..., min_length=1, max_length=4000, description="where and when; what is going on")
    user: str | None = Field(None, max_length=64, description="the player's name in the scene")

    @field_validator("npcs")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("an NPC appears twice")
        return v


class SceneTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    speaker: str | None = Field(None, description="'player' (with `content`), or an NPC of the scene: it speaks "
                                "next (or says `content`, a scripted line)")
    content: str | None = Field(None, min_length=1, max_length=8000)
    auto: int = Field(0, ge=0, le=32, description="NPC turns to generate (after the player's line: default 1)")
    stream: bool = True
    max_tokens: int | None = Field(64, ge=1, le=512)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None

    @model_validator(mode="after")
    def _something_happens(self):
        if self.speaker == "player" and not self.content:
            raise ValueError("`content`: the player's line is needed with speaker 'player'")
        if self.speaker == "player" and "auto" not in self.model_fields_set:
            self.auto = 1
        if self.speaker is None and self.auto == 0:
            raise ValueError("`auto`: give a speaker, or a number of NPC turns")
        if self.speaker is None and self.content:
            raise ValueError("`speaker`: whose line is `content`?")
        return self


class SessionMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(..., min_length=1, max_length=8000)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    response_format: ResponseFormat | None = None
