"""Structured answers: `response_format` and `tools` become a grammar for the engine's decoder, and a
tool call's text becomes OpenAI's `tool_calls`."""

from __future__ import annotations

import json
import re
import secrets

from service.errors import ApiError
from service.protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
_ANY_OBJECT = {"type": "object"}


def _checked_schema(schema: dict, param: str) -> dict:
    """A JSON Schema the caller gave: invalid ones are a 400 here, not an engine error later."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise ApiError(400, f"{param}: not a valid JSON Schema: {e.message}", param=param,
                       code="invalid_schema") from None
    return schema


def _call_schema(req: ChatCompletionRequest) -> dict:
    """One call of one of the allowed functions: {"name": ..., "arguments": {...}}."""
    tools = req.tools or []
    if isinstance(req.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == req.tool_choice.function.name]
    options = [{"type": "object", "properties": {
        "name": {"const": t.function.name},
        "arguments": _checked_schema(t.function.parameters or _ANY_OBJECT, f"tools.{i}.function.parameters")},
        "required": ["name", "arguments"], "additionalProperties": False} for i, t in enumerate(tools)]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tools_prompt(req: ChatCompletionRequest) -> str | None:
    """What the model is told about its tools (appended to the system prompt)."""
    if not req.calls_tools():
        return None
    lines = [f"You can act through these functions. To call one, answer with {CALL_OPEN}"
             '{"name": <function name>, "arguments": <JSON object>}' f"{CALL_CLOSE}."]
    for t in req.tools:
        f = t.function
        lines.append(f"- {f.name}: {f.description or ''} Parameters: {json.dumps(f.parameters or _ANY_OBJECT)}")
    return "\n".join(lines)


def constraint(req: ChatCompletionRequest):
    """The engine's StructuredOutputsParams for this request, or None for free text. (JSON comes without
    free whitespace: the engines are started so, launch.py.)"""
    from vllm.sampling_params import StructuredOutputsParams

    if req.calls_tools():
        if req.tool_choice in (None, "auto"):
            tag = {"type": "structural_tag", "triggers": [CALL_OPEN], "structures": [
                {"begin": CALL_OPEN, "schema": _call_schema(req), "end": CALL_CLOSE}]}
            return StructuredOutputsParams(structural_tag=json.dumps(tag))
        return StructuredOutputsParams(json=_call_schema(req))
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=_checked_schema(rf.json_schema.schema_ or _ANY_OBJECT,
                                                        "response_format.json_schema.schema"))


def _tool_call(obj: dict) -> ToolCall:
    return ToolCall(id="call_" + secrets.token_hex(12),
                    function=FunctionCall(name=obj["name"], arguments=json.dumps(obj.get("arguments", {}))))


def split_calls(req: ChatCompletionRequest, text: str, finish: str) -> tuple[str | None, list[ToolCall] | None, str]:
    """(content, tool_calls, finish_reason) of one generated answer. A call cut off by max_tokens
    stays text with finish_reason 'length'."""
    if not req.calls_tools() or finish == "length":
        return text, None, finish
    if req.tool_choice in (None, "auto"):
        calls = []
        for m in _CALL.finditer(text):
            try:
                calls.append(_tool_call(json.loads(m.group(1))))
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, None, finish
        if not calls:
            return text, None, finish
        content = _CALL.sub("", text).strip()
        return content or None, calls, "tool_calls"
    try:
        return None, [_tool_call(json.loads(text))], "tool_calls"
    except (json.JSONDecodeError, KeyError, TypeError):
        return text, None, finish


def call_text(calls: list[dict]) -> str:
    """An assistant turn's earlier tool calls, as the model itself would have written them."""
    out = []
    for c in calls:
        f = c.get("function") or {}
        try:
            args = json.loads(f.get("arguments") or "{}")
        except (json.JSONDecodeError, TypeError):
            args = f.get("arguments")
        out.append(CALL_OPEN + json.dumps({"name": f.get("name"), "arguments": args}) + CALL_CLOSE)
    return "".join(out)
