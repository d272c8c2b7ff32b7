"""`rbee up --routing-policy` and the cluster file's `routing_policy` reach the queen (issue 26)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.cli.clusterfile import ClusterFileError, parse
from rbee.common.serve import parse_settings
from rbee.queen.settings import QueenSettings

from .conftest import Invoke


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # A cluster file in the default place must not leak in from the machine running the tests.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RBEE_CONFIG", raising=False)
    monkeypatch.setenv("RBEE_TOKEN", "t")
    return tmp_path


def test_prefix_is_the_queens_default_policy() -> None:
    settings = parse_settings(QueenSettings, "queen-rbee", [])
    assert (settings.routing_policy, settings.prefix_load_margin) == ("prefix", 0.5)


def test_the_cluster_files_policy_and_margin_reach_the_queen() -> None:
    cluster = parse(
        '[queen]\nrouting_policy = "least-loaded"\nprefix_load_margin = 0.25\n\n[[hive]]\n',
        path="cluster.toml",
        local_hive_id="here",
    )
    settings = parse_settings(QueenSettings, "queen-rbee", cluster.queen.flags())
    assert (settings.routing_policy, settings.prefix_load_margin) == ("least-loaded", 0.25)
    with pytest.raises(ClusterFileError, match="routing_policy"):
        parse('[queen]\nrouting_policy = "fastest"\n', path="c.toml", local_hive_id="here")


def test_up_passes_its_routing_policy_to_the_queen(rbee: Invoke, home: Path) -> None:
    result = rbee("up", "--routing-policy", "least-loaded", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "--routing-policy least-loaded" in result.output
    config = home / "cluster.toml"
    config.write_text('[queen]\nrouting_policy = "round-robin"\n\n[[hive]]\n')
    from_file = rbee("up", "--config", str(config), "--dry-run")
    assert "--routing-policy round-robin" in from_file.output
    # The flag wins over the file: the queen takes the last of a flag given twice.
    both = rbee("up", "--config", str(config), "--routing-policy", "prefix", "--dry-run")
    line = next(x for x in both.output.splitlines() if "queen on" in x)
    assert line.rindex("--routing-policy prefix") > line.index("--routing-policy round-robin")
    assert rbee("up", "--routing-policy", "fastest", "--dry-run").exit_code == 2
