"""`rbee key create` against real queens: refused where keys would guard nothing, and one key
store per cluster (two queens of one user never accept each other's keys)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rbee_testing.processes import ServerProcess, console_script, free_port

from .conftest import Run

pytestmark = pytest.mark.e2e
TOKEN = "e2e-keys-token"


def queen(port: int, env: dict[str, str]) -> ServerProcess:
    return ServerProcess(
        [console_script("queen-rbee"), "--port", str(port)],
        health_url=f"http://127.0.0.1:{port}/health",
        env=env,
    )


def test_a_token_less_queen_refuses_to_create_keys(
    rbee: Run, env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    with queen(port, {**env, "HOME": str(tmp_path)}):
        created = rbee("--queen-url", f"http://127.0.0.1:{port}", "key", "create", "alice")
    assert created.returncode == 1
    assert created.stdout == ""  # no key printed
    assert "no cluster token, so it checks no API keys" in created.stderr
    assert "RBEE_TOKEN" in created.stderr


def test_two_clusters_of_one_user_keep_their_own_keys(
    rbee: Run, env: dict[str, str], tmp_path: Path
) -> None:
    home = {**env, "HOME": str(tmp_path), "RBEE_TOKEN": TOKEN}
    first, second = free_port(), free_port()
    with queen(first, home), queen(second, home):
        created = rbee(
            "--queen-url",
            f"http://127.0.0.1:{first}",
            "--token-file",
            str(token_file(tmp_path)),
            "key",
            "create",
            "bob",
        )
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        auth = {"authorization": f"Bearer {key}"}
        assert httpx.get(f"http://127.0.0.1:{first}/v1/models", headers=auth).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{second}/v1/models", headers=auth).status_code == 401
    share = tmp_path / ".local" / "share" / "rbee"
    assert (share / f"queen-{first}" / "keys.sqlite3").is_file()


def token_file(where: Path) -> Path:
    path = where / "token"
    path.write_text(TOKEN)
    return path
