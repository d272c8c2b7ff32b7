"""What `rbee up` plans from a cluster file, and how remote commands are put together: the ssh
command line, and where the token travels (never in an argument)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rbee.cli import plan
from rbee.cli.cluster import all_or_none
from rbee.cli.clusterfile import parse
from rbee.cli.context import CliError
from rbee.cli.remote_hive import RemoteHive, parse_record
from rbee.cli.ssh import Ssh, SshTarget

FILE = """
[queen]
port = 7900
queue_size = 4

[[hive]]
ssh = "me@box2"

[[hive]]
ssh = "me@[fd00::3]"
hive_id = "three"

[[hive]]

[[worker]]
model = "a"
count = 4

[[worker]]
model = "b"
hive = "three"
"""


def cluster_plan(token: str | None = "t") -> plan.UpPlan:
    cluster = parse(FILE, path="c.toml", local_hive_id="here")
    return plan.from_file(cluster, Path("c.toml"), token=token)


def test_workers_take_turns_over_the_hives_unless_they_name_one() -> None:
    placed = [(w.model, w.hive_id) for w in cluster_plan().workers]
    assert placed == [("a", "box2"), ("a", "three"), ("a", "here"), ("a", "box2"), ("b", "three")]


def test_the_queen_listens_on_the_network_when_hives_are_elsewhere() -> None:
    up = cluster_plan()
    assert (up.queen_host, up.port, up.queen_url) == ("0.0.0.0", 7900, "http://127.0.0.1:7900")
    assert up.queen_args == ("--queue-size", "4")
    assert up.problem() is None
    assert "cluster token" in (cluster_plan(token=None).problem() or "")


def test_dry_run_lists_each_thing_it_would_start() -> None:
    assert plan.describe(cluster_plan()) == [
        "rbee up would start (from c.toml):",
        "  queen on 0.0.0.0:7900 with --queue-size 4",
        "  hive box2 on me@box2 over SSH, listening on 0.0.0.0:7835, reached at http://box2:7835",
        "    reports to the queen at the address its SSH connection comes from, port 7900",
        "  hive three on me@[fd00::3] over SSH, listening on 0.0.0.0:7835, reached at "
        "http://[fd00::3]:7835",
        "    reports to the queen at the address its SSH connection comes from, port 7900",
        "  hive here on this machine, listening on 127.0.0.1:7835, reached at "
        "http://127.0.0.1:7835",
        "  1 worker of a on hive box2",
        "  1 worker of a on hive three",
        "  1 worker of a on hive here",
        "  1 worker of a on hive box2",
        "  1 worker of b on hive three",
    ]


def test_without_a_file_everything_is_local_and_on_loopback() -> None:
    up = plan.from_flags(model="m", workers=2, port=1, hive_port=2, hive_id="h")
    assert up.queen_host == "127.0.0.1"
    assert [(h.hive_id, h.ssh, h.listen_host) for h in up.hives] == [("h", None, "127.0.0.1")]
    assert [w.hive_id for w in up.workers] == ["h", "h"]
    assert up.problem() is None


@pytest.mark.parametrize("bad", ["-oProxyCommand=x", "a b", "me@", "@host", "me@host;ls", ""])
def test_ssh_targets_that_ssh_could_misread_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="is not USER@HOST"):
        SshTarget.parse(bad)


def test_rbee_ssh_command_replaces_ssh_and_its_options_come_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RBEE_SSH_COMMAND", "ssh -i '/keys/my key' -p 2222")
    argv = Ssh(SshTarget.parse("me@box2")).argv("sh -s")
    assert argv == [
        *("ssh", "-i", "/keys/my key", "-p", "2222"),
        *("-T", "-o", "ConnectTimeout=15", "me@box2", "sh -s"),
    ]
    monkeypatch.delenv("RBEE_SSH_COMMAND")
    assert Ssh(SshTarget.parse("box2")).argv("sh -s")[0] == "ssh"


def test_the_token_travels_inside_the_script_never_as_an_argument() -> None:
    hive = RemoteHive(SshTarget.parse("me@box2"), port=7836)
    script = hive.start_script("http://127.0.0.1:7833", "s3cret")
    assert "RBEE_TOKEN=s3cret; export RBEE_TOKEN" in script
    launch = next(line for line in script.splitlines() if "nohup" in line)
    assert "s3cret" not in launch
    assert "--hive-id box2 --advertise-host box2" in launch
    assert "--host 0.0.0.0 --port 7836" in launch
    assert "unset RBEE_TOKEN" in hive.start_script("http://127.0.0.1:7833", None)


def test_a_loopback_queen_url_becomes_the_ssh_client_address_on_the_remote() -> None:
    hive = RemoteHive(SshTarget.parse("me@box2"))
    defaulted = hive.start_script("http://127.0.0.1:7900", None)
    assert "queen=''" in defaulted
    assert 'queen="http://$client:7900"' in defaulted
    given = RemoteHive(SshTarget.parse("me@box2"), queen_url="http://127.0.0.1:7900")
    assert "queen=http://127.0.0.1:7900" in given.start_script("http://x:1", None)
    lan = hive.start_script("http://10.0.0.1:7833", None)
    assert "queen=http://10.0.0.1:7833" in lan


def test_the_remote_record_is_read_back() -> None:
    text = "rbee: running 4242\npid=4242\nhive_id=box2\nurl=http://box2:7835\nqueen_url=http://q\n"
    assert parse_record(text) == {
        "state": "running",
        "pid": "4242",
        "hive_id": "box2",
        "url": "http://box2:7835",
        "queen_url": "http://q",
    }


async def test_when_one_hive_fails_to_start_the_others_stop_starting() -> None:
    other_started = asyncio.Event()
    other_cancelled = False

    async def fails() -> None:
        await other_started.wait()
        raise CliError("SSH to me@box2 failed: Connection refused")

    async def slow() -> None:
        nonlocal other_cancelled
        other_started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            other_cancelled = True
            raise

    with pytest.raises(CliError, match="Connection refused"):
        await all_or_none(fails(), slow())
    assert other_cancelled


def test_the_memory_limit_reaches_each_hive_command_line() -> None:
    text = '[[hive]]\nssh = "me@box2"\nmemory_limit = "4GiB"\n\n[[hive]]\nmemory_limit = "8GiB"\n'
    cluster = parse(text, path="c.toml", local_hive_id="here")
    remote, local = plan.from_file(cluster, Path("c.toml"), token="t").hives
    assert remote.remote(None).hive_args()[-2:] == ["--memory-limit", "4GiB"]
    assert local.local_args("http://q")[-2:] == ["--memory-limit", "8GiB"]
    # `rbee up --memory-limit` is for this machine's hives; the file's other hives keep theirs.
    remote, local = plan.from_file(cluster, Path("c.toml"), token="t", memory_limit=1 << 30).hives
    assert (remote.memory_limit, local.memory_limit) == (4 << 30, 1 << 30)
    assert "    its workers may take at most 1GiB per device" in plan.describe(
        plan.from_file(cluster, Path("c.toml"), token="t", memory_limit=1 << 30)
    )
    flags = plan.from_flags(model="m", workers=1, port=1, hive_port=2, hive_id="h")
    assert "--memory-limit" not in flags.hives[0].local_args("http://q")
