"""Structured output and tool calls, as constraints on generation. Pure functions, no engine.

A local model has no tool-calling head: rbee teaches it one JSON shape in a system message and
constrains generation to that shape with a grammar made from a JSON schema, so the answer
always parses. The shape is an envelope: `{"tool_calls": [{"name": …, "arguments": {…}}]}` when
the model calls functions, `{"content": "…"}` when it answers in words (only offered when
`tool_choice` is `auto`). Each call's `arguments` follows its function's `parameters` schema,
so a forced call always carries arguments that validate. Earlier turns that called tools are
shown to the model in the same envelope, and tool results as a user turn, which every chat
template accepts (many refuse a `tool` role or two user turns in a row).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rbee.contracts.openai import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionSpec,
    NamedToolChoice,
    ToolCall,
)
from rbee.worker.engines.base import Message

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas. Only these
# are walked: the values of `const`, `enum` or `default` are data, never to be changed.
_SUBSCHEMA = frozenset(
    {"items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties"}
)
_SUBSCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


def closed(schema: Any) -> Any:
    """The schema with every object that does not say otherwise closed to extra properties.

    Whatever matches the result matches the original too; it only stops a small model from
    inventing keys until it runs out of tokens."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA:
            out[key] = closed(value)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [closed(item) for item in value]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed(sub) for name, sub in value.items()}
        else:
            out[key] = value
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _call_schema(function: FunctionSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": function.name},
            "arguments": closed(function.parameters or NO_ARGUMENTS),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _calls_schema(functions: Sequence[FunctionSpec], single: bool) -> dict[str, Any]:
    calls = [_call_schema(f) for f in functions]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if single:
        array["maxItems"] = 1
    return {
        "type": "object",
        "properties": {"tool_calls": array},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }


CONTENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"content": {"type": "string"}},
    "required": ["content"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class ChatPlan:
    """What to ask the engine for one chat request, and how to read its answer."""

    messages: list[Message]
    json_schema: Mapping[str, Any] | None = None
    # The answer is the tool envelope, to be parsed into tool calls or content.
    tools: bool = False


def _functions(request: ChatCompletionRequest) -> list[FunctionSpec]:
    return [tool.function for tool in request.tools or [] if tool.function is not None]


def tool_choice(request: ChatCompletionRequest) -> str | NamedToolChoice:
    """OpenAI's default: `auto` when tools are given, `none` when not."""
    if request.tool_choice is not None:
        return request.tool_choice
    return "auto" if request.tools else "none"


def _instructions(functions: Sequence[FunctionSpec], choice: str | NamedToolChoice) -> str:
    listed = "\n".join(
        json.dumps(
            {
                "name": f.name,
                "description": f.description or "",
                "parameters": f.parameters or NO_ARGUMENTS,
            }
        )
        for f in functions
    )
    call = '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}'
    if isinstance(choice, NamedToolChoice):
        how = f"Call the function {choice.function.name} by answering with JSON: {call}"
    elif choice == "required":
        how = f"Call one or more of them by answering with JSON: {call}"
    else:
        how = (
            f"To call functions, answer with JSON: {call}. "
            'To answer without calling a function, answer with JSON: {"content": "<your answer>"}'
        )
    return f"You can call these functions:\n{listed}\n{how}"


def _shown(message: ChatMessage) -> Message:
    """One earlier turn as the model should read it."""
    role = "system" if message.role == "developer" else message.role
    if message.role == "assistant" and message.tool_calls:
        calls = [
            {"name": c.function.name, "arguments": _loads_or_text(c.function.arguments)}
            for c in message.tool_calls
        ]
        return Message(role="assistant", content=json.dumps({"tool_calls": calls}))
    return Message(role=role, content=message.text())


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _history(messages: Sequence[ChatMessage]) -> list[Message]:
    """The conversation, with tool results folded into user turns (one per run of results)."""
    out: list[Message] = []
    for message in messages:
        if message.role != "tool":
            out.append(_shown(message))
            continue
        result = f"Result of tool call {message.tool_call_id or ''}: {message.text()}".strip()
        if out and out[-1].role == "user" and out[-1].content.startswith("Result of tool call"):
            out[-1] = Message(role="user", content=f"{out[-1].content}\n{result}")
        else:
            out.append(Message(role="user", content=result))
    return out


def _with_system(messages: list[Message], text: str) -> list[Message]:
    if messages and messages[0].role == "system":
        first = messages[0]
        return [Message(role="system", content=f"{first.content}\n\n{text}"), *messages[1:]]
    return [Message(role="system", content=text), *messages]


def plan_chat(request: ChatCompletionRequest) -> ChatPlan:
    """Messages and constraint for a request already checked by `capabilities.check_chat`."""
    messages = _history(request.messages)
    choice = tool_choice(request)
    functions = _functions(request)
    if choice != "none" and functions:
        if isinstance(choice, NamedToolChoice):
            chosen = [f for f in functions if f.name == choice.function.name]
            schema = _calls_schema(chosen, single=True)
        else:
            single = request.parallel_tool_calls is False
            schema = _calls_schema(functions, single)
            if choice == "auto":
                schema = {"anyOf": [schema, CONTENT_SCHEMA]}
        messages = _with_system(messages, _instructions(functions, choice))
        return ChatPlan(messages, schema, tools=True)
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return ChatPlan(messages)
    if fmt.type == "json_object" or fmt.json_schema is None:
        return ChatPlan(messages, ANY_OBJECT)
    return ChatPlan(messages, closed(fmt.json_schema.json_schema or ANY_OBJECT))


@dataclass(frozen=True)
class ToolAnswer:
    content: str | None
    tool_calls: list[ToolCall]


def read_tool_answer(text: str) -> ToolAnswer:
    """The envelope the model wrote, as OpenAI's message fields. Text that is not a complete
    envelope (the answer was cut short by max_tokens) is returned as content, unchanged."""
    try:
        data = json.loads(text)
    except ValueError:
        return ToolAnswer(text, [])
    if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
        calls = [
            ToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}",
                function=FunctionCall(
                    name=str(call.get("name", "")),
                    arguments=json.dumps(call.get("arguments", {}), ensure_ascii=False),
                ),
            )
            for call in data["tool_calls"]
            if isinstance(call, dict)
        ]
        return ToolAnswer(None, calls)
    if isinstance(data, dict) and isinstance(data.get("content"), str):
        return ToolAnswer(data["content"], [])
    return ToolAnswer(text, [])
