"""`rbee infer`: ask the cluster, through the queen's OpenAI API, and stream the answer;
`rbee chat`: the same, as a conversation typed line by line (or read from standard input)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Annotated

import typer

from rbee.cli.context import Cli, CliError, cli_of
from rbee.cli.render import model_names
from rbee.clients.queen import AnswerStats, QueenClient, QueenHTTPError
from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT

# Long enough for a real answer, short enough that a small model rambling on ends within a
# minute or so on a CPU (without it, one prompt once ran for 1 min 52 s).
DEFAULT_MAX_TOKENS = 512
END_COMMANDS = frozenset({"/bye", "/exit", "/quit"})

MaxTokens = Annotated[
    int, typer.Option(min=1, help="Longest answer, in tokens; a longer one is cut there.")
]
Temperature = Annotated[
    float,
    typer.Option(
        min=0.0, max=2.0, help="Sampling temperature; 0 gives the same answer every time."
    ),
]
System = Annotated[str, typer.Option(help="System message sent before the prompt; empty for none.")]


async def pick_model(client: QueenClient) -> str:
    """With no -m: the default model if loaded, else the only loaded model, else the default."""
    loaded = [m.id for m in await client.models() if m.rbee.state == "loaded"]
    if DEFAULT_MODEL in loaded or not loaded:
        return DEFAULT_MODEL
    if len(loaded) == 1:
        return loaded[0]
    raise CliError(f"several models are loaded ({', '.join(loaded)}) — pick one with -m MODEL")


async def unknown_model(client: QueenClient, model: str) -> CliError:
    known = await client.models()
    return CliError(f"unknown model {model!r} — the cluster knows: {model_names(known)}")


def speed_line(
    stats: AnswerStats, pieces: int, started: float, first: float | None, ended: float
) -> str:
    """`42 tokens in 1.9 s, 24.3 tokens/s (first token after 0.31 s)`: the rate of generation,
    from the first token to the last, as a chat tool shows it."""
    tokens = stats.completion_tokens if stats.completion_tokens is not None else pieces
    first = started if first is None else first
    generating = ended - first
    # The first token is the prompt's work; the rate is of those that came after it.
    rate = (tokens - 1) / generating if tokens > 1 and generating > 0 else None
    line = f"{tokens} token{'s' if tokens != 1 else ''} in {ended - started:.1f} s"
    if rate is not None:
        line += f", {rate:.1f} tokens/s"
    if first is not None and tokens:
        line += f" (first token after {first - started:.2f} s)"
    return line


async def answer(
    cli: Cli,
    client: QueenClient,
    model: str,
    messages: list[dict[str, str]],
    params: dict[str, float | int],
    *,
    stream: bool = True,
) -> str:
    """Ask once: the answer printed as it comes, then its speed on stderr. Returns its text."""
    stats = AnswerStats()
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    try:
        if not stream:
            text = await client.chat(model, messages, stats=stats, **params)
            first = time.perf_counter()
            sys.stdout.write(text)
            pieces.append(text)
        else:
            async for piece in client.chat_stream(model, messages, stats=stats, **params):
                if first is None:
                    first = time.perf_counter()
                sys.stdout.write(piece)
                sys.stdout.flush()
                pieces.append(piece)
    except QueenHTTPError as exc:
        if exc.status == 404 and exc.code == "model_not_found":
            raise await unknown_model(client, model) from exc
        raise
    finally:
        if pieces:  # end the answer's line, even when the stream broke off
            sys.stdout.write("\n")
            sys.stdout.flush()
    ended = time.perf_counter()
    line = speed_line(stats, len(pieces), started, first, ended)
    if stats.finish_reason == "length":
        line += f"; cut at --max-tokens {params.get('max_tokens')} (raise it for a longer answer)"
    cli.warn(line)
    return "".join(pieces)


def infer(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[
        str | None,
        typer.Option("-m", "--model", help="Model id (default: the loaded one, or the default)."),
    ] = None,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temperature: Temperature = 0.0,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the answer when it is complete.")
    ] = False,
    system: System = DEFAULT_SYSTEM_PROMPT,
) -> None:
    """Ask a model through the queen and print the answer as it is generated; its speed
    (tokens per second) follows on stderr."""
    cli = cli_of(ctx)
    # Greedy by default: a question asked from the command line should get the same answer
    # twice, and small models ramble at the servers' usual 0.8.
    params: dict[str, float | int] = {"temperature": temperature, "max_tokens": max_tokens}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})

    async def ask(client: QueenClient) -> None:
        chosen = model or await pick_model(client)
        await answer(cli, client, chosen, messages, params, stream=not no_stream)

    cli.run(ask)


def chat(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(
            help="Model id (default: the loaded one, or the default).", show_default=False
        ),
    ] = None,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temperature: Temperature = 0.0,
    system: System = DEFAULT_SYSTEM_PROMPT,
) -> None:
    """Talk with a model: each line you type is sent with the whole conversation so far, and
    the answer streams back. /clear forgets the conversation; /bye or Ctrl-D ends it. Lines
    can come from a pipe too (`printf 'hi\\nand then?\\n' | rbee chat`)."""
    cli = cli_of(ctx)
    params: dict[str, float | int] = {"temperature": temperature, "max_tokens": max_tokens}
    opening = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()

    async def converse(client: QueenClient) -> None:
        chosen = model or await pick_model(client)
        if interactive:
            cli.warn(f"chatting with {chosen} — /clear forgets, /bye or Ctrl-D ends")
        messages = list(opening)
        while True:
            if interactive:
                sys.stdout.write(">>> ")
                sys.stdout.flush()
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:  # end of input (Ctrl-D)
                if interactive:
                    sys.stdout.write("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text in END_COMMANDS:
                return
            if text == "/clear":
                messages = list(opening)
                cli.warn("conversation cleared")
                continue
            messages.append({"role": "user", "content": text})
            reply = await answer(cli, client, chosen, messages, params)
            messages.append({"role": "assistant", "content": reply})

    cli.run(converse)


def register(app: typer.Typer) -> None:
    app.command()(infer)
    app.command()(chat)
