"""Any model in a few keystrokes, with the real `rbee` CLI against a stand-in Hugging Face Hub
(the real Hub is out of reach here) and a plain web server (the stand-in's /files/): `rbee model
pull` without a cluster, a URL, no network, a resume, a file that is not GGUF, `rbee model list`,
and `rbee worker spawn -m org/repo:file.gguf` that downloads before it starts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL, bundled_model_path
from rbee_testing.gguf import gguf_bytes
from rbee_testing.processes import console_script, free_port

from .conftest import Daemon, HiveStarter

pytestmark = pytest.mark.e2e


def rbee(
    *args: str, queen_url: str | None = None, hub: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub,
        "RBEE_QUEEN_URL": queen_url or f"http://127.0.0.1:{free_port()}",  # none answers there
        "COLUMNS": "250",
    }
    env.pop("RBEE_TOKEN", None)
    return subprocess.run(
        [console_script("rbee"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def publish(root: Path, relative: str, data: bytes) -> bytes:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def test_pull_without_a_cluster_fetches_a_hub_file_and_a_url_into_the_models_folder(
    hub: Daemon, hub_root: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    smol = bundled_model_path(DEFAULT_MODEL)
    if smol is None:
        pytest.skip("the bundled SmolLM2 package is not installed")
    (hub_root / "acme" / "Smol-GGUF").mkdir(parents=True)
    shutil.copy(smol, hub_root / "acme" / "Smol-GGUF" / "smol.gguf")
    plain = publish(hub_root, "files/models/plain.gguf", gguf_bytes(300_000))

    pulled = rbee(
        "model", "pull", "acme/Smol-GGUF:smol.gguf", "--models-dir", str(models), hub=hub.url
    )
    assert pulled.returncode == 0, pulled.stderr
    assert "no cluster is running: downloading into" in pulled.stderr
    assert "downloading acme/Smol-GGUF:smol.gguf" in pulled.stderr  # the progress bar's label
    assert (models / "acme" / "Smol-GGUF" / "smol.gguf").read_bytes() == smol.read_bytes()

    url = f"{hub.url}/files/models/plain.gguf"
    fetched = rbee("model", "download", url, "--models-dir", str(models), hub=hub.url)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.startswith("downloaded plain.gguf into")
    assert (models / "plain.gguf").read_bytes() == plain

    listed = rbee("model", "list", "--models-dir", str(models), hub=hub.url)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("acme/Smol-GGUF"))
    # Size, quantization, trained context and the memory at the default 8192 tokens x 2 slots.
    assert "98.4 MB" in line
    assert "Q4_1" in line
    assert " 8192 " in line
    assert "(8192x2)" in line
    assert any(ln.startswith("plain.gguf") for ln in listed.stdout.splitlines())


def test_without_network_a_download_says_so_in_words(tmp_path: Path) -> None:
    offline = "http://models.rbee-test.invalid"  # a name that never resolves
    done = rbee(
        "model", "pull", "acme/Any-GGUF:any.gguf", "--models-dir", str(tmp_path), hub=offline
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("rbee: cannot reach the model host: no network"), last
    assert "Errno" not in done.stderr


def test_a_download_that_broke_off_resumes_where_it_stopped(
    hub: Daemon, hub_root: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    # `cut` in the name: the stand-in drops the connection halfway through the first time.
    data = publish(hub_root, "acme/Big-GGUF/big.cut.gguf", gguf_bytes(3 * 1024 * 1024, seed=1))
    ref = "acme/Big-GGUF:big.cut.gguf"

    first = rbee("model", "pull", ref, "--models-dir", str(models), hub=hub.url)
    assert first.returncode == 1
    assert "broke off after" in first.stderr
    assert "the same download again resumes it" in first.stderr
    assert not (models / "acme" / "Big-GGUF" / "big.cut.gguf").exists()
    [partial] = (models / ".partial").iterdir()
    assert 0 < partial.stat().st_size < len(data)

    again = rbee("model", "pull", ref, "--models-dir", str(models), hub=hub.url)
    assert again.returncode == 0, again.stderr
    assert "resuming acme/Big-GGUF:big.cut.gguf after" in again.stderr
    assert (models / "acme" / "Big-GGUF" / "big.cut.gguf").read_bytes() == data
    assert not list((models / ".partial").iterdir())


def test_a_file_that_is_not_gguf_is_refused_with_what_it_is(
    hub: Daemon, hub_root: Path, tmp_path: Path
) -> None:
    publish(hub_root, "files/page.gguf", b"<!DOCTYPE html><html><body>Sign in</body></html>" * 50)
    done = rbee(
        "model",
        "download",
        f"{hub.url}/files/page.gguf",
        "--models-dir",
        str(tmp_path),
        hub=hub.url,
    )
    assert done.returncode == 1
    assert "page.gguf is not a GGUF model file: it is an HTML page" in done.stderr
    assert not (tmp_path / "page.gguf").exists()
    assert not any((tmp_path / ".partial").iterdir())


def test_worker_spawn_of_a_hub_file_no_hive_has_downloads_it_then_starts_it(
    queen: Daemon, start_hive: HiveStarter, hub: Daemon, hub_root: Path
) -> None:
    smol = bundled_model_path(DEFAULT_MODEL)
    if smol is None:
        pytest.skip("the bundled SmolLM2 package is not installed")
    (hub_root / "acme" / "Smol-GGUF").mkdir(parents=True)
    shutil.copy(smol, hub_root / "acme" / "Smol-GGUF" / "smol.gguf")
    hive = start_hive()
    model = "acme/Smol-GGUF:smol.gguf"

    spawned = rbee(
        "worker", "spawn", "-m", model, "--ctx-size", "512", queen_url=queen.url, hub=hub.url
    )
    assert spawned.returncode == 0, spawned.stderr
    assert f"{model} is not on any hive yet: downloading it" in spawned.stderr
    assert f"ready: {model} at" in spawned.stdout
    answer = httpx.post(
        f"{queen.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    catalog = httpx.get(f"{hive.url}/v1/models", timeout=10).json()["models"]
    assert model in [m["id"] for m in catalog]
