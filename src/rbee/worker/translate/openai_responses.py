"""OpenAI Responses (`/v1/responses`) as chat completions and back, for the requests the worker
cannot pass through to llama.cpp: tools on a model whose chat template knows none. The request
becomes a chat completions one (answered with rbee's grammar-and-system-message tool calls,
`rbee.worker.structured`); the chat answer becomes a Response, whole or as the events of its
stream. Also the Responses fields no worker honours, refused by name, and `text.format` as the
`response_format` llama.cpp does honour. Pure functions.
"""

from __future__ import annotations

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

RESPONSES_REFUSED = {
    "previous_response_id": "`previous_response_id` is not supported: this server stores no "
    "responses; send the whole conversation in `input`",
    "conversation": "`conversation` is not supported: this server stores no conversations; "
    "send the whole conversation in `input`",
    "background": "`background` responses are not supported: this server answers at once",
    "prompt": "stored prompts (`prompt`) are not supported: send `instructions` and `input`",
}


def check_responses(body: Mapping[str, Any]) -> None:
    """Fields of a Responses request no worker can honour, whichever way it is served."""
    refuse(body, RESPONSES_REFUSED, false_is_unset=True)


def responses_format(body: Mapping[str, Any]) -> JsonObject | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    text = body.get("text")
    if text is None:
        return None
    fmt = object_at(text, "text").get("format")
    if fmt is None:
        return None
    fmt = object_at(fmt, "text.format")
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
        for i, item in enumerate(array_at(given, "input")):
            _responses_item(object_at(item, f"input[{i}]"), f"input[{i}]", messages)
    chat: JsonObject = {"model": body.get("model"), "messages": messages}
    copy_sampling(body, chat, "max_output_tokens")
    tools = []
    for i, tool in enumerate(array_at(body.get("tools") or [], "tools")):
        tool = object_at(tool, f"tools[{i}]")
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
        text = text_of(
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
            else text_of(output, f"{where}.output", ("input_text",))
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
                "id": new_id("msg_"),
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
                "id": new_id("fc_"),
                "call_id": call.id,
                "name": call.function.name,
                "arguments": call.function.arguments,
                "status": "completed",
            }
        )
    cut = choice.finish_reason == "length" and not choice.message.tool_calls
    response: JsonObject = {
        "id": new_id("resp_"),
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
        return sse_event(kind, {"type": kind, "sequence_number": next(sequence), **fields})

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
