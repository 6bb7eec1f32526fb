"""Request and response models of the public API (OpenAI-compatible where it overlaps).

Importable without torch: options are checked by `pruning.options`, which needs none.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from pruning import PruneError
from pruning.options import METHOD_NAMES, validate_request_options

MAX_PERSONA_CHARS = 4000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.'\-]{0,63}$"


class NpcCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=NAME_PATTERN,
                             description="display name, 1-64 chars (taken from the card when omitted)")
    persona: str | None = Field(None, min_length=1, max_length=MAX_PERSONA_CHARS,
                                description="persona description (or give `card`)")
    card: dict[str, Any] | None = Field(None, description="a Tavern V1/V2/V3 character card object")
    sparsity: float = Field(0.25, ge=0, le=0.9, description="share of FFN channels to remove, in [0, 0.9]; 0: a "
                            "prompt-only NPC (the dense base with the persona prompt), ready at once, no job")
    method: str | None = Field(None, description="pruning method (default: persona-pruner, NPC_DEFAULT_METHOD)")
    options: dict[str, Any] | None = Field(None, description='method options, e.g. {"profile": "fast"}, '
                                           '{"steps": 80}, {"recover": true}')
    evaluate: bool | None = Field(None, description="score the NPC against the dense base when it is ready "
                                  "(default: NPC_EVALUATE)")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    keep_alive: float | str | None = Field(
        None, description="residency once ready, kept across restarts: seconds or '5m' idle before the NPC "
                          "leaves its engine, -1 or 'pin' (loaded when ready and never evicted), 0 (released "
                          "after each request); default NPC_KEEP_ALIVE")

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v):
        return parse_keep_alive(v)

    @field_validator("persona")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("persona must not be blank")
        return v.strip() if v else v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str | None) -> str | None:
        if v is not None and v not in METHOD_NAMES:
            raise ValueError(f"unknown method {v!r}; choose one of: {', '.join(sorted(METHOD_NAMES))}")
        return v

    @field_validator("options")
    @classmethod
    def _known_options(cls, v: dict | None) -> dict | None:
        if not v:
            return v
        try:  # keys and values (types, ranges): a bad one is a 400 now, not a failed job later
            validate_request_options(v)
        except PruneError as e:
            raise ValueError(str(e)) from None
        return v


class Npc(BaseModel):
    id: str
    object: Literal["npc"] = "npc"
    name: str
    persona: str
    sparsity: float
    method: str
    base: str
    status: Literal["queued", "running", "ready", "failed", "cancelled"]
    stage: str | None = None
    progress: float = 0.0
    error: str | None = None
    created: float
    updated: float
    ready_at: float | None = None
    eta_s: float | None = None
    timings: dict[str, float] | None = None
    attempts: int = 0
    kept_per_layer: int | None = None
    options: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = Field(None, description="evaluation against the dense base, once known")
    greeting: str | None = None
    persona_truncated: bool = False
    keep_alive: float | None = Field(None, description="the NPC's residency (seconds; -1 pinned); null: the default")
    serving: Literal["prompt", "pruned"] | None = Field(
        None, description="what answers its chats now: the dense base with its persona prompt (a prompt-only NPC, "
                          "or while its prune runs), or its pruned model; null: nothing (failed, cancelled)")


class NpcList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Npc]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = Field(None, description="pass as `after` for the next page")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") in ("text", None))


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_keep_alive(v: Any) -> float | None:
    """Ollama-style residency: seconds, "5m"/"1h"/"30s", -1 or "pin" (never evict), 0 (leave after)."""
    if v is None:
        return None
    if isinstance(v, str):
        t = v.strip().lower()
        if t in ("pin", "forever", "-1"):
            return -1.0
        try:
            v = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
        except ValueError:
            raise ValueError("keep_alive: seconds, a duration like '5m', or -1/'pin'") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("keep_alive: seconds, a duration like '5m', or -1/'pin'")
    if v < 0:
        return -1.0
    return float(v)


class KeepAliveMixin(BaseModel):
    keep_alive: float | str | None = Field(
        None, description="how long the NPC stays in its engine slot after this request: seconds, "
                          "'5m', -1 or 'pin' (never evicted), 0 (released right after)")

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v):
        return parse_keep_alive(v)


class NpcLoad(KeepAliveMixin):
    model_config = ConfigDict(extra="forbid")
    wait_s: float | None = Field(
        None, ge=0, le=3600, description="how long to wait for the load before answering 202 while it goes on "
                                         "(an engine start takes a minute on a CPU); default NPC_LOAD_WAIT_S")


class StreamOptions(BaseModel):
    include_usage: bool = False


TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., pattern=TOOL_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: `json_schema` is given exactly when type is 'json_schema'")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class _ToolName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: _ToolName


# OpenAI chat fields that would change the answer and that we cannot honour: a 400, never ignored
_UNSUPPORTED_CHAT = {
    "functions": "use `tools`", "function_call": "use `tool_choice`", "logit_bias": "not supported",
    "audio": "audio output is not supported", "prediction": "not supported",
    "web_search_options": "not supported",
}


class ChatCompletionRequest(KeepAliveMixin):
    # OpenAI clients send fields we do not use (metadata, store, ...): ignore, do not reject
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    response_format: ResponseFormat | None = Field(
        None, description="`json_object` or `json_schema`: the answer is JSON (that schema), decoded under a grammar")
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'auto' (default with tools): prose or a call; 'required' or a named function: a call, "
                          "grammar-constrained to the function's parameters")
    parallel_tool_calls: bool | None = None
    greeting_index: int | None = Field(None, ge=0, description="which of the card's greetings opens the chat "
                                       "(0: its first message, 1..: its alternate greetings)")
    _summary: str | None = PrivateAttr(None)  # a session's memory of turns no longer in `messages`

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            for field, why in _UNSUPPORTED_CHAT.items():
                if data.get(field) not in (None, {}, []):
                    raise ValueError(f"`{field}` is not supported here ({why})")
            if data.get("modalities") not in (None, ["text"]):
                raise ValueError("`modalities`: only ['text'] is supported")
        return data

    @model_validator(mode="after")
    def _tools_agree(self):
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("`tool_choice` needs `tools`")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"`tool_choice` names '{self.tool_choice.function.name}', which is not in `tools`")
        if self.tools and self.tool_choice != "none" and self.response_format and self.response_format.type != "text":
            raise ValueError("`response_format` and `tools` cannot both constrain one answer; give one")
        if self.tools and len({t.function.name for t in self.tools}) < len(self.tools):
            raise ValueError("`tools`: function names must be unique")
        return self

    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


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


class CompletionRequest(KeepAliveMixin):
    """Legacy text completions: a raw continuation of the NPC's model (no persona, no chat template)."""
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    best_of: int | None = Field(None, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _chat_only(cls, data):
        if isinstance(data, dict):
            for field in ("response_format", "tools", "tool_choice", "logit_bias", "functions"):
                if data.get(field) not in (None, {}, []):
                    raise ValueError(f"`{field}` is not supported on /v1/completions"
                                     + (" (use /v1/chat/completions)" if field != "logit_bias" else ""))
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and len(v) > 16 and not isinstance(v[0], int):
            raise ValueError("at most 16 prompts per request")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v


# -- responses ------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON text, as OpenAI sends them")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda v: v is None)  # absent, as OpenAI's


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class _Response(BaseModel):
    """What every completion response and stream chunk carries."""
    id: str
    created: int
    model: str
    system_fingerprint: str


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None  # sent (null until the last chunk) only with stream_options.include_usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class TextCompletion(_Response):
    """A /v1/completions response, and each of its stream's chunks (OpenAI uses one object for both)."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage | None = None


def chunk_json(chunk: BaseModel, include_usage: bool) -> str:
    return chunk.model_dump_json(exclude=None if include_usage else {"usage"})
