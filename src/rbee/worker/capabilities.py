"""What the worker can honour. A field it cannot is refused with 400 naming it, never dropped:
a client that asked for audio or two choices must not believe it got them.

Fields that change nothing a local model produces (`store`, `metadata`, `service_tier`,
`prediction`, `user`...) pass, as unknown fields do: OpenAI would not fail on them either.
"""

from __future__ import annotations

from typing import Any

from rbee.common.errors import BadRequest, Unsupported, quote
from rbee.contracts.embeddings import EmbeddingRequest
from rbee.contracts.openai import ChatCompletionRequest, CompletionRequest, NamedToolChoice

# Chat fields a text-only local model cannot honour, with the reason given to the client.
_CHAT_REFUSED = {
    "audio": "audio output is not supported: this server generates text only",
    "functions": "`functions` is the deprecated form of tools: send `tools` instead",
    "function_call": "`function_call` is the deprecated form of tools: send `tool_choice`",
    "reasoning_effort": "`reasoning_effort` is not supported by this model",
    "verbosity": "`verbosity` is not supported by this model",
    "web_search_options": "web search is not supported by this server",
}


def _refuse_extras(extra: dict[str, Any] | None, refused: dict[str, str]) -> None:
    for name, value in (extra or {}).items():
        if name in refused and value is not None:
            raise Unsupported(name, refused[name])


def _one_choice(n: int) -> None:
    if n != 1:
        raise Unsupported("n", f"n={n} is not supported: this server returns one choice (n=1)")


def check_logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise BadRequest(
                f"logit_bias keys must be token ids, got {quote(key)}", param="logit_bias"
            ) from None
    return out


def check_chat(request: ChatCompletionRequest) -> None:
    _refuse_extras(request.model_extra, _CHAT_REFUSED)
    _one_choice(request.n)
    modalities = (request.model_extra or {}).get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise Unsupported("modalities", "only the text modality is supported")
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise Unsupported(
                        f"messages[{i}].content[{j}].type",
                        f"content parts of type {quote(part.type)} are not supported: "
                        "this model reads text only",
                    )
    _check_tools(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequest("top_logprobs needs logprobs to be true", param="top_logprobs")
    check_logit_bias(request.logit_bias)


def _check_tools(request: ChatCompletionRequest) -> None:
    names = set()
    for i, tool in enumerate(request.tools or []):
        if tool.type != "function" or tool.function is None:
            raise Unsupported(
                f"tools[{i}].type",
                f"tools of type {quote(tool.type)} are not supported: only function tools are",
            )
        names.add(tool.function.name)
    choice = request.tool_choice
    if choice not in (None, "none") and not request.tools:
        raise BadRequest("tool_choice needs tools to choose from", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise BadRequest(
            f"tool_choice names function {quote(choice.function.name)}, which is not in tools",
            param="tool_choice",
        )
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise BadRequest(
            "response_format of type json_schema needs a json_schema",
            param="response_format.json_schema",
        )
    if request.tools and choice != "none" and fmt is not None and fmt.type != "text":
        raise Unsupported(
            "response_format",
            "response_format cannot be combined with tools here: the tool calls are already "
            "structured output (use tool_choice 'none' to get a JSON answer)",
        )


def check_completion(request: CompletionRequest) -> None:
    _one_choice(request.n)
    extra = request.model_extra or {}
    best_of = extra.get("best_of")
    if best_of not in (None, 1):
        raise Unsupported("best_of", "best_of is not supported: this server makes one choice")
    if extra.get("suffix"):
        raise Unsupported("suffix", "suffix (insertion) is not supported by this model")
    if request.echo:
        raise Unsupported("echo", "echo is not supported: the answer holds the new text only")
    if isinstance(request.prompt, list) and len(request.prompt) > 1:
        raise Unsupported("prompt", "one prompt per request: a list must hold exactly one")
    check_logit_bias(request.logit_bias)


def check_embedding(request: EmbeddingRequest, dimensions: int) -> list[str]:
    """The texts to embed."""
    if request.dimensions is not None and request.dimensions != dimensions:
        raise Unsupported(
            "dimensions",
            f"this model's embeddings have {dimensions} dimensions and cannot be shortened; "
            "leave out dimensions or ask for exactly that",
        )
    if isinstance(request.input, str):
        return [request.input]
    texts = [item for item in request.input if isinstance(item, str)]
    if len(texts) != len(request.input):
        raise Unsupported(
            "input",
            "token ids are not supported as input: their meaning depends on the tokenizer; "
            "send text",
        )
    return texts
