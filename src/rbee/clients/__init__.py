"""Typed async HTTP clients for rbee's daemons. Each takes an optional httpx transport, so tests
plug in an in-process app or a mock instead of patching."""
