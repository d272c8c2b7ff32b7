"""`rbee hive install --ssh` reads the remote script's output to its end, however long a line,
through a real `ssh` stand-in that runs the remote command here."""

from __future__ import annotations

import stat
from pathlib import Path

import psutil
import pytest

from rbee.cli.install import error_of
from rbee.cli.ssh import Ssh, SshTarget
from rbee.common.lines import MAX_LINE_BYTES

# ssh's argv is OPTIONS… TARGET COMMAND: run COMMAND here, as the remote's sh would.
FAKE_SSH = '#!/bin/sh\nfor last; do :; done\nexec sh -c "$last"\n'


@pytest.fixture
def ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ssh:
    program = tmp_path / "ssh"
    program.write_text(FAKE_SSH)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("RBEE_SSH_COMMAND", str(program))
    return Ssh(SshTarget.parse("box"))


async def test_a_line_of_300_kb_is_cut_and_the_script_is_read_to_its_exit(ssh: Ssh) -> None:
    script = (
        "echo building\n"
        "head -c 300000 /dev/zero | tr '\\0' x\n"
        "echo\n"
        "echo 'rbee: error compiling llama.cpp failed'\n"
        "exit 3\n"
    )
    seen: list[str] = []
    before = set(psutil.Process().children(recursive=True))  # other fixtures' servers
    result = await ssh.stream(script, seen.append, timeout_s=60)
    assert result.code == 3
    assert error_of(result.out) == "compiling llama.cpp failed"
    assert seen[0] == "building"
    assert seen[1] == "x" * MAX_LINE_BYTES + f" …[{300_000 - MAX_LINE_BYTES} more bytes]"
    started = set(psutil.Process().children(recursive=True)) - before
    assert not [p for p in started if p.is_running()], "the ssh process is gone"
