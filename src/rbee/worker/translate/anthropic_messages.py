"""Anthropic Messages (`/v1/messages`) as chat completions and back, for the requests the worker
cannot pass through to llama.cpp: tools on a model whose chat template knows none. The request
becomes a chat completions one (answered with rbee's grammar-and-system-message tool calls,
`rbee.worker.structured`); the chat answer becomes an Anthropic Message, whole or as the events
of its stream. Also the Messages fields no worker honours, refused by name. Pure functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from rbee.common.errors import BadRequest, Unsupported, quote
from rbee.contracts.openai import ChatCompletion
from rbee.worker.translate.common import (
    JsonObject,
    array_at,
    copy_sampling,
    new_id,
    object_at,
    refuse,
    sse_event,
    text_of,
)

ANTHROPIC_REFUSED = {
    "top_k": "`top_k` is not supported with tools on this model (its tool calls use rbee's "
    "grammar fallback, which samples with temperature and top_p only)",
}

# Fields of a Messages request that llama.cpp would drop without a word.
MESSAGES_REFUSED = {
    "output_config": "`output_config` (structured output) is not supported on /v1/messages: "
    "ask for JSON in the prompt, or use /v1/chat/completions with `response_format`",
}


def check_messages(body: Mapping[str, Any]) -> None:
    """Fields of a Messages request no worker can honour."""
    refuse(body, MESSAGES_REFUSED)


def chat_from_messages(body: Mapping[str, Any]) -> JsonObject:
    """An Anthropic Messages request as a chat completions request."""
    refuse(body, ANTHROPIC_REFUSED)
    messages: list[JsonObject] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": text_of(system, "system", ("text",))})
    for i, message in enumerate(array_at(body.get("messages"), "messages")):
        message = object_at(message, f"messages[{i}]")
        messages.extend(_anthropic_turn(message, f"messages[{i}]"))
    chat: JsonObject = {"model": body.get("model"), "messages": messages}
    copy_sampling(body, chat, "max_tokens")
    tools = []
    for i, tool in enumerate(array_at(body.get("tools") or [], "tools")):
        tool = object_at(tool, f"tools[{i}]")
        if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            raise Unsupported(
                f"tools[{i}].type",
                f"tools of type {quote(tool.get('type'))} are not supported: only client tools "
                "(name, description, input_schema) are",
            )
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        choice = object_at(choice, "tool_choice")
        kind = choice.get("type")
        if kind == "tool":
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "none"):
            chat["tool_choice"] = kind
        elif kind == "any":
            chat["tool_choice"] = "required"
        else:
            raise BadRequest(f"tool_choice.type {quote(kind)} is not known", param="tool_choice")
        if choice.get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False
    return chat


def _anthropic_turn(message: JsonObject, where: str) -> list[JsonObject]:
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise BadRequest(f"{where}.role must be user or assistant", param=f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    texts: list[str] = []
    calls: list[JsonObject] = []
    results: list[JsonObject] = []
    for j, block in enumerate(array_at(content, f"{where}.content")):
        block = object_at(block, f"{where}.content[{j}]")
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use" and role == "assistant":
            arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
            calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {"name": str(block.get("name", "")), "arguments": arguments},
                }
            )
        elif kind == "tool_result" and role == "user":
            result = block.get("content", "")
            text = text_of(result, f"{where}.content[{j}].content", ("text",))
            if block.get("is_error") is True:
                text = f"Error: {text}"
            results.append(
                {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text}
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's own earlier reasoning: not shown again, as Anthropic does
        else:
            raise Unsupported(
                f"{where}.content[{j}].type",
                f"content blocks of type {quote(kind)} are not supported here: this model "
                "reads text, tool_use and tool_result blocks only",
            )
    turns: list[JsonObject] = list(results)
    if role == "assistant":
        turn: JsonObject = {"role": "assistant", "content": "".join(texts) or None}
        if calls:
            turn["tool_calls"] = calls
        turns.append(turn)
    elif texts or not results:
        turns.append({"role": "user", "content": "".join(texts)})
    return turns


def _anthropic_stop(finish: str, calls: bool) -> str:
    if calls:
        return "tool_use"
    return "max_tokens" if finish == "length" else "end_turn"


def message_from_chat(answer: ChatCompletion) -> JsonObject:
    """A chat answer as an Anthropic Message."""
    choice = answer.choices[0]
    blocks: list[JsonObject] = []
    if choice.message.content:
        blocks.append({"type": "text", "text": choice.message.content})
    for call in choice.message.tool_calls or []:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = {}
        blocks.append(
            {
                "type": "tool_use",
                "id": f"toolu_{call.id.removeprefix('call_')}",
                "name": call.function.name,
                "input": arguments,
            }
        )
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": blocks,
        "stop_reason": _anthropic_stop(choice.finish_reason, bool(choice.message.tool_calls)),
        "stop_sequence": None,
        "usage": {
            "input_tokens": answer.usage.prompt_tokens,
            "output_tokens": answer.usage.completion_tokens,
        },
    }


def message_events(message: JsonObject) -> Iterator[bytes]:
    """A whole Anthropic Message as the events of its stream."""
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0},
    }
    yield sse_event("message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            opened: JsonObject = {"type": "text", "text": ""}
            delta: JsonObject = {"type": "text_delta", "text": block["text"]}
        else:
            opened = {**block, "input": {}}
            partial = json.dumps(block["input"], ensure_ascii=False)
            delta = {"type": "input_json_delta", "partial_json": partial}
        yield sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opened},
        )
        yield sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )
        yield sse_event("content_block_stop", {"type": "content_block_stop", "index": index})
    yield sse_event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield sse_event("message_stop", {"type": "message_stop"})
