"""The cluster file: what a good one gives, and one clear line for each kind of mistake."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from rbee.cli.clusterfile import ClusterFileError, load, parse
from rbee.common.serve import parse_settings
from rbee.queen.settings import QueenSettings

GOOD = """
[queen]
port = 7900
heartbeat_timeout = 30

[[hive]]
ssh = "me@box2"
remote_command = "~/venv/bin/rbee-hive"

[[hive]]
ssh = "box3.lan"
hive_id = "three"
advertise_host = "10.0.0.3"
port = 7836
worker_ports = "9000-9010"

[[hive]]
# this machine

[[worker]]
model = "smollm2-135m-instruct"
count = 2

[[worker]]
model = "other"
hive = "three"
"""


def problem(text: str) -> str:
    with pytest.raises(ClusterFileError) as caught:
        parse(textwrap.dedent(text), path="cluster.toml", local_hive_id="here")
    return str(caught.value)


def test_a_good_file_gives_the_queen_the_hives_with_their_ids_and_the_workers() -> None:
    cluster = parse(GOOD, path="cluster.toml", local_hive_id="here")
    assert cluster.queen.port == 7900
    assert cluster.queen.flags() == ["--heartbeat-timeout", "30.0"]
    assert [(h.ssh, h.hive_id, h.port) for h in cluster.hive] == [
        ("me@box2", "box2", 7835),
        ("box3.lan", "three", 7836),
        (None, "here", 7835),
    ]
    assert cluster.hive[1].worker_ports == "9000-9010"
    assert [(w.model, w.count, w.hive) for w in cluster.worker] == [
        ("smollm2-135m-instruct", 2, None),
        ("other", 1, "three"),
    ]


def test_an_unknown_key_names_its_line_and_the_keys_allowed() -> None:
    message = problem(
        """
        [[hive]]
        ssh = "me@box2"
        adress = "10.0.0.2"
        """
    )
    assert message.startswith("cluster.toml line 4: hive[1].adress: unknown key (allowed: ssh,")
    assert "advertise_host" in message


def test_an_unknown_table_names_its_line() -> None:
    message = problem('[[hive]]\nssh = "a@b"\n[workers]\nmodel = "x"\n')
    assert message.startswith("cluster.toml line 3: workers: unknown key")


def test_a_bad_address_names_the_key_and_the_value() -> None:
    message = problem(
        """
        [[hive]]
        ssh = "me@box2"

        [[hive]]
        ssh = "me@box3"
        advertise_host = "box 3!"
        """
    )
    assert message == (
        "cluster.toml line 7: hive[2].advertise_host: 'box 3!' is not a host name or an IP address"
    )


def test_a_bad_ssh_target_is_refused() -> None:
    message = problem('[[hive]]\nssh = "-oProxyCommand=evil"\n')
    assert message.startswith(
        "cluster.toml line 2: hive[1].ssh: '-oProxyCommand=evil' is not USER@HOST"
    )


def test_duplicate_hive_ids_point_at_the_second() -> None:
    message = problem(
        """
        [[hive]]
        ssh = "me@box2"

        [[hive]]
        ssh = "you@box2"
        """
    )
    assert message.startswith("cluster.toml line 5: hive[2].hive_id: duplicate hive id 'box2'")
    assert "hive 1 has it too" in message


def test_a_worker_on_an_unknown_hive_is_refused() -> None:
    message = problem('[[hive]]\nssh = "a@b"\n\n[[worker]]\nmodel = "m"\nhive = "c"\n')
    assert message == "cluster.toml line 6: worker[1].hive: no hive 'c' in this file (hives: b)"


def test_wrong_types_and_ranges_are_named() -> None:
    assert problem('[queen]\nport = 99999\n[[hive]]\nssh = "a@b"\n').startswith(
        "cluster.toml line 2: queen.port: Input should be less than or equal to 65535"
    )
    assert problem('[[hive]]\nworker_ports = "9000-8000"\n').startswith(
        "cluster.toml line 2: hive[1].worker_ports: '9000-8000': expected 1 <= FIRST <= LAST"
    )
    assert problem("[[hive]]\n[[worker]]\ncount = 2\n") == (
        "cluster.toml line 2: worker[1].model: missing"
    )


def test_a_file_without_hives_and_broken_toml_are_explained() -> None:
    assert problem("[queen]\nport = 1\n") == (
        "cluster.toml: hive: the file needs at least one [[hive]] table"
    )
    assert "not valid TOML" in problem("[[hive]\n")
    assert "line 1" in problem("[[hive]\n")


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ClusterFileError, match="No such file"):
        load(tmp_path / "nope.toml", local_hive_id="here")


def test_a_hive_memory_limit_is_read_in_binary_units_and_a_bad_one_is_named() -> None:
    cluster = parse(
        '[[hive]]\nmemory_limit = "8GiB"\n\n[[hive]]\nssh = "me@box2"\nmemory_limit = 536870912\n',
        path="cluster.toml",
        local_hive_id="here",
    )
    assert [h.memory_limit for h in cluster.hive] == [8 << 30, 512 << 20]
    assert problem(
        """
        [[hive]]
        memory_limit = "-2GiB"
        """
    ) == ("cluster.toml line 3: hive[1].memory_limit: '-2GiB': a size cannot be negative")
    assert "unknown unit 'GB'" in problem('[[hive]]\nmemory_limit = "8GB"\n')


def test_keep_alives_reach_the_queen_for_all_models_and_per_model() -> None:
    cluster = parse(
        '[queen]\nkeep_alive = "10m"\n\n[[hive]]\n\n'
        '[models."qwen2.5-coder-7b"]\nkeep_alive = "30m"\n\n[models.small]\nkeep_alive = -1\n',
        path="cluster.toml",
        local_hive_id="here",
    )
    assert cluster.queen.flags() == ["--keep-alive", "10m"]
    assert cluster.model_flags() == [
        "--model-keep-alive", "qwen2.5-coder-7b=30m",
        "--model-keep-alive", "small=-1",
    ]  # fmt: skip
    bad = problem('[[hive]]\n\n[models.m]\nkeep_alive = "banana"\n')
    assert "models.m.keep_alive" in bad
    assert "'banana' is not a duration" in bad
    assert (
        "unknown key (allowed: keep_alive, max_replicas, min_replicas, ctx_size, slots)"
        in problem("[[hive]]\n\n[models.m]\nttl = 5\n")
    )


def test_a_model_id_with_a_comma_or_an_equals_sign_keeps_its_settings() -> None:
    """The queen's `--model-…` flags read `a,b=1` as two pairs and `a=b=1` as `a`: such an id
    goes as a JSON object, and the queen gets each value for the whole id."""
    cluster = parse(
        '[[hive]]\n\n[models."v1,v2.gguf"]\nkeep_alive = "30m"\nmax_replicas = 2\n\n'
        '[models."q=4.gguf"]\nkeep_alive = -1\nslots = 3\n\n[models.plain]\nkeep_alive = "1m"\n',
        path="cluster.toml",
        local_hive_id="here",
    )
    flags = cluster.model_flags()
    assert flags[:2] == ["--model-keep-alive", '{"v1,v2.gguf": "30m"}']
    assert flags[-2:] == ["--model-keep-alive", "plain=1m"]
    settings = parse_settings(QueenSettings, "queen-rbee", flags)
    assert settings.model_keep_alive == {"v1,v2.gguf": 1800.0, "q=4.gguf": math.inf, "plain": 60.0}
    assert settings.max_replicas_of("v1,v2.gguf") == 2
    assert settings.model_slots == {"q=4.gguf": 3}


def test_a_per_model_flag_the_queen_cannot_read_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(QueenSettings, "queen-rbee", ["--model-keep-alive", "v1,v2.gguf=30m"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "queen-rbee: error: --model-keep-alive: cannot read its value: give MODEL=VALUE, or a "
        "JSON object such as '{\"MODEL\": VALUE}' for an id with ',' or '='\n"
    )


def test_replica_bounds_reach_the_queen_for_all_models_and_per_model() -> None:
    cluster = parse(
        "[queen]\nreplica_after = 5\nmax_replicas = 4\n\n[[hive]]\n\n"
        '[models."qwen2.5-coder-7b"]\nmax_replicas = 2\nmin_replicas = 1\n',
        path="cluster.toml",
        local_hive_id="here",
    )
    assert cluster.queen.flags() == ["--replica-after", "5.0", "--max-replicas", "4"]
    assert cluster.model_flags() == [
        "--model-max-replicas", "qwen2.5-coder-7b=2",
        "--model-min-replicas", "qwen2.5-coder-7b=1",
    ]  # fmt: skip
    flags = [*cluster.queen.flags(), *cluster.model_flags()]
    settings = parse_settings(QueenSettings, "queen-rbee", flags)
    assert settings.replica_after == 5.0
    assert settings.min_replicas_of("qwen2.5-coder-7b") == 1
    assert settings.max_replicas_of("qwen2.5-coder-7b") == 2
    assert settings.max_replicas_of("other") == 4
    bad = problem("[[hive]]\n\n[models.m]\nmax_replicas = 0\n")
    assert "models.m.max_replicas" in bad
    assert "greater than or equal to 1" in bad


def test_the_swap_wait_reaches_the_queen() -> None:
    cluster = parse(
        "[queen]\nswap_max_wait = 5\n\n[[hive]]\n", path="cluster.toml", local_hive_id="here"
    )
    assert cluster.queen.flags() == ["--swap-max-wait", "5.0"]
    settings = parse_settings(QueenSettings, "queen-rbee", cluster.queen.flags())
    assert settings.swap_max_wait == 5.0
    assert "queen.swap_max_wait" in problem("[queen]\nswap_max_wait = -1\n\n[[hive]]\n")
