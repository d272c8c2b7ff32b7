"""What the worker's Anthropic Messages and OpenAI Responses translations share: reading a
request's JSON (objects, arrays, text blocks, sampling fields, refused fields), whether it asks
for tools, and writing ids and the events of an answer's stream. Pure functions, no engine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from rbee.common.errors import BadRequest, Unsupported, quote

JsonObject = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def object_at(value: Any, where: str) -> JsonObject:
    if not isinstance(value, dict):
        raise BadRequest(f"`{where}` must be an object", param=where)
    return value


def array_at(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"`{where}` must be an array", param=where)
    return value


def text_of(content: Any, where: str, text_types: tuple[str, ...]) -> str:
    """A string, or the text of a list of text blocks; other blocks are refused."""
    if isinstance(content, str):
        return content
    texts = []
    for i, block in enumerate(array_at(content, where)):
        block = object_at(block, f"{where}[{i}]")
        kind = block.get("type")
        if kind not in text_types or not isinstance(block.get("text"), str):
            raise Unsupported(
                f"{where}[{i}].type",
                f"content blocks of type {quote(kind)} are not supported here: this model "
                "reads text only",
            )
        texts.append(block["text"])
    return "".join(texts)


def copy_sampling(body: Mapping[str, Any], chat: JsonObject, limit_field: str) -> None:
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


def refuse(
    body: Mapping[str, Any], refused: Mapping[str, str], false_is_unset: bool = False
) -> None:
    """A 400 naming the first of `refused` the request sets, and why (null is unset; so is false,
    where `false_is_unset`)."""
    for name, why in refused.items():
        value = body.get(name)
        if value is not None and not (false_is_unset and value is False):
            raise Unsupported(name, why)


def sse_event(event: str, data: JsonObject) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
