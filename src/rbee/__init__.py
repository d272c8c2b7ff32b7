"""rbee: one OpenAI-compatible URL in front of the machines you already have."""

__version__ = "0.1.0"
