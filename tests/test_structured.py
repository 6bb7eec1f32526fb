"""Structured answers on the real server with the official client: JSON under a schema, tool calls
in OpenAI's shape, and a 400 naming the field for whatever is not supported."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

ACTION = {"type": "object", "additionalProperties": False, "required": ["action", "target", "mood"],
          "properties": {"action": {"type": "string", "enum": ["attack", "flee", "talk", "trade"]},
                         "target": {"type": "string", "maxLength": 24},
                         "mood": {"type": "integer", "minimum": 0, "maximum": 10}}}
TOOLS = [{"type": "function", "function": {
             "name": "give_item", "description": "hand the player an item",
             "parameters": {"type": "object", "additionalProperties": False, "required": ["item", "count"],
                            "properties": {"item": {"type": "string", "maxLength": 20},
                                           "count": {"type": "integer", "minimum": 1, "maximum": 9}}}}},
         {"type": "function", "function": {
             "name": "open_door", "description": "open a door of the ship",
             "parameters": {"type": "object", "additionalProperties": False, "required": ["door"],
                            "properties": {"door": {"type": "string", "enum": ["hold", "cabin", "deck"]}}}}}]
ASK = [{"role": "user", "content": "A goblin steps aboard. What do you do?"}]


def test_json_schema_answers_validate_20_of_20(oai, npc_a):
    fmt = {"type": "json_schema", "json_schema": {"name": "npc_action", "schema": ACTION, "strict": True}}
    answers = []
    for n in (8, 8, 4):  # 20 answers, sampled
        r = oai.chat.completions.create(model=npc_a["id"], messages=ASK, n=n, temperature=1.0, max_tokens=60,
                                        seed=len(answers), response_format=fmt)
        answers += [c.message.content for c in r.choices]
    assert len(answers) == 20
    for a in answers:
        jsonschema.validate(json.loads(a), ACTION)


def test_json_object(oai, npc_a):
    r = oai.chat.completions.create(model=npc_a["id"], messages=ASK, max_tokens=80, temperature=0.7, seed=1,
                                    response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":  # an object may be cut off by max_tokens; a finished one parses
        assert isinstance(json.loads(c.message.content), dict)
    assert c.message.content.lstrip().startswith("{")


def test_named_and_required_tool_calls(oai, npc_a, openai_schemas):
    r = oai.chat.completions.create(model=npc_a["id"], messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                                    tool_choice={"type": "function", "function": {"name": "open_door"}})
    jsonschema.Draft202012Validator(openai_schemas["CreateChatCompletionResponse"]).validate(
        r.model_dump(exclude_unset=True))  # OpenAI's own response schema, tool_calls and all
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "open_door" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])

    r = oai.chat.completions.create(model=npc_a["id"], messages=ASK, tools=TOOLS, tool_choice="required",
                                    max_tokens=60, temperature=0.8, seed=3, n=4)
    for c in r.choices:
        (call,) = c.message.tool_calls
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)

    # the call and its result go back into the history, as a game sends them
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "done"}]
    r = oai.chat.completions.create(model=npc_a["id"], messages=history, tools=TOOLS, tool_choice="none",
                                    max_tokens=12, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_streamed_tool_call(oai, npc_a):
    stream = oai.chat.completions.create(model=npc_a["id"], messages=ASK, tools=TOOLS, tool_choice="required",
                                         max_tokens=60, temperature=0, stream=True)
    calls, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1 and calls[0].function.name in ("give_item", "open_door")
    json.loads(calls[0].function.arguments)


def test_auto_tool_choice_answers_prose_or_a_valid_call(oai, npc_a):
    r = oai.chat.completions.create(model=npc_a["id"], messages=ASK, tools=TOOLS, max_tokens=40, temperature=0)
    c = r.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        json.loads(c.message.tool_calls[0].function.arguments)
    else:
        assert c.message.content and "<tool_call>" not in c.message.content or c.finish_reason == "length"


@pytest.mark.parametrize("extra, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS}, "response_format"),
])
def test_unsupported_or_invalid_is_a_400_naming_the_field(server, npc_a, extra, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": npc_a["id"], "messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_completions_refuse_chat_only_fields(oai, npc_a):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=npc_a["id"], prompt="hi", max_tokens=4,
                               extra_body={"response_format": {"type": "json_object"}})
    assert "response_format" in str(e.value)
