"""Ollama's API in terms of OpenAI's, for the queen's `/api/...` routes
(`rbee.queen.api.ollama`): pure translations both ways, no I/O. `requests`: an Ollama request as
the OpenAI body the queen routes; `answers`: the worker's answer as Ollama's lines or whole
answer; `models`: Ollama's model listings."""
