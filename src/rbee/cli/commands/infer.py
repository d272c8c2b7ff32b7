"""`rbee infer`: ask the cluster, through the queen's OpenAI API, and stream the answer."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rbee.cli.context import CliError, cli_of
from rbee.cli.render import model_names
from rbee.clients.queen import QueenClient, QueenHTTPError
from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT


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


def infer(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[
        str | None,
        typer.Option("-m", "--model", help="Model id (default: the loaded one, or the default)."),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Longest answer, in tokens.")
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(
            min=0.0, max=2.0, help="Sampling temperature; 0 gives the same answer every time."
        ),
    ] = 0.0,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the answer when it is complete.")
    ] = False,
    system: Annotated[
        str,
        typer.Option(help="System message sent before the prompt; empty for none."),
    ] = DEFAULT_SYSTEM_PROMPT,
) -> None:
    """Ask a model through the queen and print the answer as it is generated."""
    cli = cli_of(ctx)
    # Greedy by default: a question asked from the command line should get the same answer
    # twice, and small models ramble at the servers' usual 0.8.
    params: dict[str, float | int] = {"temperature": temperature}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})

    async def ask(client: QueenClient) -> None:
        chosen = model or await pick_model(client)
        wrote = False
        try:
            if no_stream:
                answer = await client.chat(chosen, messages, **params)
                sys.stdout.write(answer)
                wrote = True
            else:
                async for piece in client.chat_stream(chosen, messages, **params):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    wrote = True
        except QueenHTTPError as exc:
            if exc.status == 404 and exc.code == "model_not_found":
                raise await unknown_model(client, chosen) from exc
            raise
        finally:
            if wrote:  # end the answer's line, even when the stream broke off
                sys.stdout.write("\n")
                sys.stdout.flush()

    cli.run(ask)


def register(app: typer.Typer) -> None:
    app.command()(infer)
