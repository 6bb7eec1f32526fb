"""OpenAI-compatible requests and responses: chat (with structured answers and tools) and text completions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from service.protocol.npcs import KeepAliveMixin


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


# vLLM's extension, on chat and completions alike
MinTokens = Annotated[int | None, Field(ge=0, description="no stop (end of turn or `stop`) before this many "
                                        "tokens (capped at max_tokens)")]


class ChatCompletionRequest(KeepAliveMixin):
    # OpenAI clients send fields we do not use (metadata, store, ...): ignore, do not reject
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: MinTokens = None
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


class CompletionRequest(KeepAliveMixin):
    """Legacy text completions: a raw continuation of the NPC's model (no persona, no chat template)."""
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: MinTokens = None
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
