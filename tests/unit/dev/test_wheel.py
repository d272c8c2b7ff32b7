"""The wheel `rbee hive install` copies to other machines holds rbee, not the test helpers."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_wheel_leaves_the_test_helpers_out(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*pip, str(ROOT), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("rbee-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rbee/queen/app.py" in names
    # What a pip install needs to build llama-server on first use (rbee.common.engine_build).
    assert "rbee/engine/llama_build.sh" in names
    assert "rbee/engine/engine.lock" in names
    assert not [n for n in names if "testing" in n.split("/")[0] or n.startswith("rbee/testing")]
