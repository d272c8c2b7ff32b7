"""Anthropic Messages and OpenAI Responses requests as chat completions, and chat answers back
in their shapes. Pure functions, no engine.

The worker passes these APIs through to llama.cpp, which serves them with the model's own chat
template. The one case it cannot serve is tools on a model whose template knows none: llama.cpp
would drop the tools silently. Those requests go through the worker's own chat completions
instead, whose tool calls fall back to the grammar-and-system-message method
(`rbee.worker.structured`), and their answer is written back as the API's own: whole, or as
its event stream (the tool envelope parses only whole, so the events follow the whole answer).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from rbee.common.errors import BadRequest, Unsupported, quote
from rbee.contracts.openai import ChatCompletion

JsonObject = dict[str, Any]


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _obj(value: Any, where: str) -> JsonObject:
    if not isinstance(value, dict):
        raise BadRequest(f"`{where}` must be an object", param=where)
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"`{where}` must be an array", param=where)
    return value


def _text_of(content: Any, where: str, text_types: tuple[str, ...]) -> str:
    """A string, or the text of a list of text blocks; other blocks are refused."""
    if isinstance(content, str):
        return content
    texts = []
    for i, block in enumerate(_list(content, where)):
        block = _obj(block, f"{where}[{i}]")
        kind = block.get("type")
        if kind not in text_types or not isinstance(block.get("text"), str):
            raise Unsupported(
                f"{where}[{i}].type",
                f"content blocks of type {quote(kind)} are not supported here: this model "
                "reads text only",
            )
        texts.append(block["text"])
    return "".join(texts)


def _sampling(body: Mapping[str, Any], chat: JsonObject, limit_field: str) -> None:
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get(limit_field) is not None:
        chat["max_tokens"] = body[limit_field]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]


def tools_asked(body: Mapping[str, Any]) -> bool:
    """The request offers tools and does not turn them off."""
    choice = body.get("tool_choice")
    off = choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none")
    return bool(body.get("tools")) and not off


# ---- Anthropic Messages -------------------------------------------------------------------

ANTHROPIC_REFUSED = {
    "top_k": "`top_k` is not supported with tools on this model (its tool calls use rbee's "
    "grammar fallback, which samples with temperature and top_p only)",
}


def chat_from_messages(body: Mapping[str, Any]) -> JsonObject:
    """An Anthropic Messages request as a chat completions request."""
    for name, why in ANTHROPIC_REFUSED.items():
        if body.get(name) is not None:
            raise Unsupported(name, why)
    messages: list[JsonObject] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text_of(system, "system", ("text",))})
    for i, message in enumerate(_list(body.get("messages"), "messages")):
        message = _obj(message, f"messages[{i}]")
        messages.extend(_anthropic_turn(message, f"messages[{i}]"))
    chat: JsonObject = {"model": body.get("model"), "messages": messages}
    _sampling(body, chat, "max_tokens")
    tools = []
    for i, tool in enumerate(_list(body.get("tools") or [], "tools")):
        tool = _obj(tool, f"tools[{i}]")
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
        choice = _obj(choice, "tool_choice")
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
    for j, block in enumerate(_list(content, f"{where}.content")):
        block = _obj(block, f"{where}.content[{j}]")
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
            text = _text_of(result, f"{where}.content[{j}].content", ("text",))
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
        "id": _id("msg_"),
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


def _sse(event: str, data: JsonObject) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def message_events(message: JsonObject) -> Iterator[bytes]:
    """A whole Anthropic Message as the events of its stream."""
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0},
    }
    yield _sse("message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            opened: JsonObject = {"type": "text", "text": ""}
            delta: JsonObject = {"type": "text_delta", "text": block["text"]}
        else:
            opened = {**block, "input": {}}
            partial = json.dumps(block["input"], ensure_ascii=False)
            delta = {"type": "input_json_delta", "partial_json": partial}
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opened},
        )
        yield _sse(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


# ---- OpenAI Responses ---------------------------------------------------------------------

RESPONSES_REFUSED = {
    "previous_response_id": "`previous_response_id` is not supported: this server stores no "
    "responses; send the whole conversation in `input`",
    "conversation": "`conversation` is not supported: this server stores no conversations; "
    "send the whole conversation in `input`",
    "background": "`background` responses are not supported: this server answers at once",
    "prompt": "stored prompts (`prompt`) are not supported: send `instructions` and `input`",
}


# Fields of a Messages request that llama.cpp would drop without a word.
MESSAGES_REFUSED = {
    "output_config": "`output_config` (structured output) is not supported on /v1/messages: "
    "ask for JSON in the prompt, or use /v1/chat/completions with `response_format`",
}


def check_messages(body: Mapping[str, Any]) -> None:
    """Fields of a Messages request no worker can honour."""
    for name, why in MESSAGES_REFUSED.items():
        if body.get(name) is not None:
            raise Unsupported(name, why)


def check_responses(body: Mapping[str, Any]) -> None:
    """Fields of a Responses request no worker can honour, whichever way it is served."""
    for name, why in RESPONSES_REFUSED.items():
        value = body.get(name)
        if value is not None and value is not False:
            raise Unsupported(name, why)


def responses_format(body: Mapping[str, Any]) -> JsonObject | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    text = body.get("text")
    if text is None:
        return None
    fmt = _obj(text, "text").get("format")
    if fmt is None:
        return None
    fmt = _obj(fmt, "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    raise Unsupported("text.format.type", f"text.format of type {quote(kind)} is not supported")


def chat_from_responses(body: Mapping[str, Any]) -> JsonObject:
    """An OpenAI Responses request as a chat completions request."""
    check_responses(body)
    messages: list[JsonObject] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": str(body["instructions"])})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    else:
        for i, item in enumerate(_list(given, "input")):
            _responses_item(_obj(item, f"input[{i}]"), f"input[{i}]", messages)
    chat: JsonObject = {"model": body.get("model"), "messages": messages}
    _sampling(body, chat, "max_output_tokens")
    tools = []
    for i, tool in enumerate(_list(body.get("tools") or [], "tools")):
        tool = _obj(tool, f"tools[{i}]")
        if tool.get("type") != "function":
            raise Unsupported(
                f"tools[{i}].type",
                f"tools of type {quote(tool.get('type'))} are not supported: only function "
                "tools are",
            )
        function = {"name": tool.get("name"), "parameters": tool.get("parameters") or {}}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise Unsupported("tool_choice", f"tool_choice {quote(choice)} is not supported")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if (fmt := responses_format(body)) is not None:
        chat["response_format"] = fmt
    return chat


def _responses_item(item: JsonObject, where: str, messages: list[JsonObject]) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise BadRequest(f"{where}.role {quote(role)} is not known", param=f"{where}.role")
        text = _text_of(
            item.get("content", ""), f"{where}.content", ("input_text", "output_text", "text")
        )
        messages.append({"role": role, "content": text})
    elif kind == "function_call":
        call = {
            "id": str(item.get("call_id", "")),
            "type": "function",
            "function": {"name": str(item.get("name", "")), "arguments": item.get("arguments", "")},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output", "")
        text = (
            output
            if isinstance(output, str)
            else _text_of(output, f"{where}.output", ("input_text",))
        )
        messages.append(
            {"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text}
        )
    elif kind == "reasoning":
        return  # the model's own earlier reasoning: not shown again
    else:
        raise Unsupported(f"{where}.type", f"input items of type {quote(kind)} are not supported")


_ECHOED = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
    "user",
)


def response_from_chat(answer: ChatCompletion, body: Mapping[str, Any]) -> JsonObject:
    """A chat answer as an OpenAI Response (the request's settings echoed, as OpenAI does)."""
    choice = answer.choices[0]
    output: list[JsonObject] = []
    if choice.message.content:
        output.append(
            {
                "type": "message",
                "id": _id("msg_"),
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": choice.message.content, "annotations": []}
                ],
            }
        )
    for call in choice.message.tool_calls or []:
        output.append(
            {
                "type": "function_call",
                "id": _id("fc_"),
                "call_id": call.id,
                "name": call.function.name,
                "arguments": call.function.arguments,
                "status": "completed",
            }
        )
    cut = choice.finish_reason == "length" and not choice.message.tool_calls
    response: JsonObject = {
        "id": _id("resp_"),
        "object": "response",
        "created_at": answer.created,
        "status": "incomplete" if cut else "completed",
        "model": answer.model,
        "output": output,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "usage": {
            "input_tokens": answer.usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": answer.usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": answer.usage.total_tokens,
        },
    }
    for name in _ECHOED:
        response[name] = body.get(name)
    response["tools"] = body.get("tools") or []
    response["tool_choice"] = body.get("tool_choice") or "auto"
    response["parallel_tool_calls"] = body.get("parallel_tool_calls") is not False
    return response


def response_events(response: JsonObject) -> Iterator[bytes]:
    """A whole Response as the events of its stream."""
    sequence = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        return _sse(kind, {"type": kind, "sequence_number": next(sequence), **fields})

    begun = {**response, "status": "in_progress", "output": [], "usage": None}
    yield event("response.created", response=begun)
    yield event("response.in_progress", response=begun)
    for index, item in enumerate(response["output"]):
        item_id = item["id"]
        if item["type"] == "message":
            text = item["content"][0]["text"]
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "content": []},
            )
            part = {"type": "output_text", "text": "", "annotations": []}
            place = {"item_id": item_id, "output_index": index, "content_index": 0}
            yield event("response.content_part.added", **place, part=part)
            yield event("response.output_text.delta", **place, delta=text, logprobs=[])
            yield event("response.output_text.done", **place, text=text, logprobs=[])
            yield event("response.content_part.done", **place, part={**part, "text": text})
        else:
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "arguments": ""},
            )
            place = {"item_id": item_id, "output_index": index}
            arguments = item["arguments"]
            yield event("response.function_call_arguments.delta", **place, delta=arguments)
            yield event("response.function_call_arguments.done", **place, arguments=arguments)
        yield event("response.output_item.done", output_index=index, item=item)
    done = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    yield event(done, response=response)
