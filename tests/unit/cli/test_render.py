"""Numbers and the `rbee up` banner as a person reads them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rbee.cli.commands.up import lan_urls, usage_text
from rbee.cli.plan import UpPlan, from_flags
from rbee.cli.render import ago, device_text, human_bytes
from rbee.contracts.hives import Device


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "?"), (0, "0 B"), (999, "999 B"), (98_000_000, "98.0 MB"), (1_500_000_000, "1.5 GB")],
)
def test_human_bytes(n: int | None, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "just now"), (3.2, "3s ago"), (119, "119s ago"), (600, "10m ago"), (10_800, "3h ago")],
)
def test_ago(seconds: float, text: str) -> None:
    assert ago(seconds) == text


def plan(**overrides: object) -> UpPlan:
    values: dict[str, object] = {
        "model": "smollm2-135m-instruct",
        "workers": 1,
        "port": 7833,
        "hive_port": 7835,
        "hive_id": "box",
    }
    values.update(overrides)
    return from_flags(**values)  # type: ignore[arg-type]


def test_banner_gives_the_openai_url_and_ready_to_paste_examples() -> None:
    text = usage_text(plan())

    assert "OpenAI base URL: http://127.0.0.1:7833/v1" in text
    assert "curl http://127.0.0.1:7833/v1/chat/completions" in text
    assert '"model": "smollm2-135m-instruct"' in text
    assert 'OpenAI(base_url="http://127.0.0.1:7833/v1", api_key="not-needed")' in text
    assert 'rbee infer "What is the capital of France?"   (and: rbee chat, status, down)\n' in text
    assert "Authorization" not in text
    assert "import os" not in text


def test_banner_on_other_ports_with_a_token_never_prints_the_token() -> None:
    text = usage_text(replace(plan(port=9100, token="s3cret", workers=2), name="port-9100"))

    assert "2 workers serving" in text
    assert "http://127.0.0.1:9100/v1" in text
    assert '-H "Authorization: Bearer $RBEE_TOKEN"' in text
    assert 'api_key=os.environ["RBEE_TOKEN"]' in text
    assert "  import os\n  from openai import OpenAI\n" in text
    # Other commands find the cluster by its name (`rbee up --name`, or port-PORT).
    assert 'rbee --cluster port-9100 infer "What is' in text
    assert "s3cret" not in text


def test_banner_names_the_lan_urls_of_a_queen_that_listens_on_all_addresses() -> None:
    text = usage_text(plan(), ["http://198.18.0.5:7833"])

    assert (
        "OpenAI base URL: http://127.0.0.1:7833/v1\nFrom other machines: http://198.18.0.5:7833/v1\n"
        in text
    )
    assert "From other machines" not in usage_text(plan())


def test_lan_urls_come_from_the_cluster_file_or_this_machines_addresses() -> None:
    assert lan_urls(plan()) == []  # a loopback queen is not reachable from elsewhere
    told = replace(plan(), queen_host="0.0.0.0", queen_url_for_hives="http://box0:7833")
    assert lan_urls(told) == ["http://box0:7833"]
    found = lan_urls(replace(plan(), queen_host="0.0.0.0"))
    assert all(url.startswith("http://") and not url.startswith("http://127.") for url in found)


def test_a_device_under_a_memory_limit_shows_what_workers_hold_of_it() -> None:
    cpu = Device(
        id="cpu:0", kind="cpu", name="x", memory_total_bytes=16 << 30, memory_free_bytes=8 << 30
    )
    assert device_text(cpu) == "cpu:0"
    limited = cpu.model_copy(
        update={
            "memory_limit_bytes": 512 << 20,
            "rbee_used_bytes": 260_000_000,
            "memory_free_bytes": 276_870_912,
        }
    )
    assert (
        device_text(limited)
        == "cpu:0 (workers hold 260.0 MB of 512MiB allowed, 276.9 MB free for more)"
    )


def test_rbee_models_shows_keep_alive_left_last_use_and_queue() -> None:
    from rich.console import Console

    from rbee.cli.render import models_table
    from rbee.clients.queen import ModelEntry

    entries = [
        ModelEntry.model_validate(
            {
                "id": "a",
                "rbee": {
                    "state": "loaded",
                    "workers": 1,
                    "keep_alive_left_s": 100,
                    "last_used_s_ago": 100,
                    "queued": 2,
                },
            }
        ),
        ModelEntry.model_validate(
            {
                "id": "b",
                "rbee": {"state": "loaded", "workers": 1, "pinned": True, "last_used_s_ago": 0},
            }
        ),
        ModelEntry.model_validate({"id": "c", "rbee": {"state": "available"}}),
    ]
    console = Console(width=200, record=True)
    console.print(models_table(entries))
    lines = console.export_text().splitlines()
    assert lines[0].split()[:7] == [
        "MODEL",
        "STATE",
        "REPLICAS",
        "QUEUED",
        "KEEP-ALIVE",
        "LEFT",
        "LAST",
    ]
    assert lines[1].split()[:6] == ["a", "loaded", "1", "2", "100s", "100s"]
    assert lines[2].split()[:6] == ["b", "loaded", "1", "0", "pinned", "now"]
    assert lines[3].split()[:6] == ["c", "available", "0", "0", "-", "-"]


def test_rbee_models_shows_replicas_with_their_bounds() -> None:
    from rich.console import Console

    from rbee.cli.render import models_table
    from rbee.clients.queen import ModelEntry

    def entry(model: str, **serving: object) -> ModelEntry:
        serving = {"state": "loaded", "keep_alive_left_s": 30, "last_used_s_ago": 0, **serving}
        return ModelEntry.model_validate({"id": model, "rbee": serving})

    entries = [
        entry("a", workers=3, max_replicas=4, queued=5),
        entry("b", workers=1, min_replicas=1, max_replicas=2, keep_alive_left_s=None),
        entry("c", workers=2),
    ]
    console = Console(width=200, record=True)
    console.print(models_table(entries))
    lines = console.export_text().splitlines()
    assert lines[1].split()[:5] == ["a", "loaded", "3", "(max", "4)"]
    assert lines[2].split()[:9] == ["b", "loaded", "1", "(min", "1,", "max", "2)", "0", "kept"]
    assert lines[3].split()[:4] == ["c", "loaded", "2", "0"]
