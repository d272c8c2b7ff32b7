"""Anthropic Messages and OpenAI Responses requests as chat completions, and chat answers back
in their shapes (`anthropic_messages`, `openai_responses`, and what both share in `common`).
Pure functions, no engine.

The worker passes these APIs through to llama.cpp, which serves them with the model's own chat
template. The one case it cannot serve is tools on a model whose template knows none: llama.cpp
would drop the tools silently. Those requests go through the worker's own chat completions
instead, whose tool calls fall back to the grammar-and-system-message method
(`rbee.worker.structured`), and their answer is written back as the API's own: whole, or as
its event stream (the tool envelope parses only whole, so the events follow the whole answer).
"""
