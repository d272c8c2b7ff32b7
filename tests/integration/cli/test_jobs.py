"""Commands that run queen jobs: workers and model files."""

from __future__ import annotations

from typing import Any

READY = {
    "type": "done",
    "message": "started",
    "result": {
        "worker_id": "w-7",
        "pid": 4242,
        "port": 8085,
        "url": "http://127.0.0.1:8085",
        "hive_id": "hive-a",
    },
}


def test_worker_spawn_waits_until_the_worker_is_ready(rbee: Any, queen: Any) -> None:
    queen.job_events["worker_spawn"] = [
        {"type": "log", "message": "spawning llm-worker-rbee on port 8085"},
        READY,
    ]
    queen.add_worker("w-7", port=8085)

    result = rbee(
        "worker", "spawn", "-m", "smollm2-135m-instruct", "--hive", "hive-a", "--device", "cpu:0"
    )

    assert result.exit_code == 0, result.output
    assert queen.jobs == [
        {
            "operation": "worker_spawn",
            "model": "smollm2-135m-instruct",
            "hive_id": "hive-a",
            "device": "cpu:0",
            "kv_cache_type": "auto",
        }
    ]
    assert "spawning llm-worker-rbee on port 8085" in result.stderr
    assert "worker w-7 ready: smollm2-135m-instruct at http://127.0.0.1:8085" in result.stdout


def test_worker_spawn_embedding_asks_for_an_embedding_worker(rbee: Any, queen: Any) -> None:
    queen.job_events["worker_spawn"] = [READY]
    queen.add_worker("w-7", port=8085, embedding=True)

    result = rbee("worker", "spawn", "-m", "smollm2-135m-instruct", "--embedding")

    assert result.exit_code == 0, result.output
    assert queen.jobs[0]["embedding"] is True
    assert "embeddings" in result.stdout


def test_worker_spawn_rerank_asks_for_a_reranking_worker(rbee: Any, queen: Any) -> None:
    queen.job_events["worker_spawn"] = [READY]
    queen.add_worker("w-7", port=8085, embedding=True, rerank=True)

    result = rbee("worker", "spawn", "-m", "jina-reranker", "--rerank")

    assert result.exit_code == 0, result.output
    assert queen.jobs[0]["rerank"] is True
    assert "rerank)" in result.stdout


def test_worker_spawn_passes_the_kv_cache_type_and_refuses_a_bad_one(rbee: Any, queen: Any) -> None:
    queen.job_events["worker_spawn"] = [READY]
    queen.add_worker("w-7", port=8085)

    result = rbee("worker", "spawn", "-m", "smollm2-135m-instruct", "--kv-cache-type", "q8_0")

    assert result.exit_code == 0, result.output
    assert queen.jobs[0]["kv_cache_type"] == "q8_0"
    bad = rbee("worker", "spawn", "-m", "smollm2-135m-instruct", "--kv-cache-type", "q4_0")
    assert bad.exit_code == 2
    assert "--kv-cache-type" in bad.output
    assert "'q4_0' is not one of" in bad.output
    assert len(queen.jobs) == 1  # nothing was sent for it


def test_worker_spawn_of_an_unknown_model_lists_the_known_ones(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct")
    queen.job_events["worker_spawn"] = [
        {"type": "error", "message": "model 'gpt-9' is not in hive-a's catalog"}
    ]

    result = rbee("worker", "spawn", "-m", "gpt-9")

    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "rbee: unknown model 'gpt-9' — the cluster knows: smollm2-135m-instruct; a model from "
        "the Hugging Face Hub starts as -m org/repo:file.gguf (downloaded first), or fetch one "
        "with `rbee model pull org/repo:file.gguf` or an https://…/file.gguf URL"
    )


def test_a_failed_job_is_one_line_with_the_queens_reason(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct")
    queen.job_events["worker_spawn"] = [{"type": "error", "message": "no free port on hive-a"}]

    result = rbee("worker", "spawn", "-m", "smollm2-135m-instruct")

    assert result.exit_code == 1
    assert result.stderr.strip() == "rbee: no free port on hive-a"


def test_worker_stop(rbee: Any, queen: Any) -> None:
    queen.job_events["worker_stop"] = [{"type": "done", "result": {"worker_id": "w-1"}}]

    result = rbee("worker", "stop", "w-1")

    assert result.exit_code == 0
    assert queen.jobs == [{"operation": "worker_stop", "worker_id": "w-1"}]
    assert result.stdout.strip() == "worker w-1 stopped"


def test_model_list_shows_every_hives_catalog(rbee: Any, queen: Any) -> None:
    model = {
        "id": "smollm2-135m-instruct",
        "name": "SmolLM2",
        "path": "/m/a.gguf",
        "size_bytes": 98_000_000,
        "format": "gguf",
        "source": "bundled",
    }
    queen.job_events["model_list"] = [
        {
            "type": "done",
            "result": {
                "models": [
                    {**model, "hive_id": "hive-a"},
                    {**model, "id": "tiny", "hive_id": "hive-b"},
                ]
            },
        }
    ]

    result = rbee("model", "list")
    one_hive = rbee("model", "list", "--hive", "hive-b", "--json")

    assert result.exit_code == 0
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("smollm2"))
    assert "hive-a" in line
    assert "98.0 MB" in line
    assert "bundled" in line
    assert any(ln.startswith("tiny") and "hive-b" in ln for ln in result.stdout.splitlines())
    assert queen.jobs[1] == {"operation": "model_list", "hive_id": "hive-b"}
    assert '"id": "tiny"' in one_hive.stdout


def test_model_rm(rbee: Any, queen: Any) -> None:
    queen.job_events["model_delete"] = [{"type": "done", "result": {"hive_id": "hive-a"}}]

    result = rbee("model", "rm", "tiny", "--hive", "hive-a")

    assert result.exit_code == 0
    assert queen.jobs == [{"operation": "model_delete", "model": "tiny", "hive_id": "hive-a"}]
    assert result.stdout.strip() == "removed tiny from hive hive-a"


def test_model_rm_of_a_missing_model_says_why(rbee: Any, queen: Any) -> None:
    queen.job_events["model_delete"] = [{"type": "error", "message": "no model 'tiny' on hive-a"}]

    result = rbee("model", "rm", "tiny")

    assert result.exit_code == 1
    assert result.stderr.strip() == "rbee: no model 'tiny' on hive-a"


def test_model_download_shows_progress_then_what_it_got(rbee: Any, queen: Any) -> None:
    mb = 1_000_000
    queen.job_events["model_download"] = [
        {"type": "log", "message": "resolving org/repo:file.gguf"},
        {"type": "progress", "bytes_done": 10 * mb, "bytes_total": 40 * mb},
        {"type": "progress", "bytes_done": 40 * mb, "bytes_total": 40 * mb},
        {
            "type": "done",
            "result": {"hive_id": "hive-a", "model": {"id": "file", "size_bytes": 40 * mb}},
        },
    ]

    result = rbee("model", "download", "org/repo:file.gguf", "--hive", "hive-a")

    assert result.exit_code == 0, result.output
    assert queen.jobs == [
        {"operation": "model_download", "model": "org/repo:file.gguf", "hive_id": "hive-a"}
    ]
    assert "resolving org/repo:file.gguf" in result.stderr
    assert "downloading org/repo:file.gguf" in result.stderr
    assert "40.0/40.0 MB" in result.stderr
    assert result.stdout.strip() == "downloaded file on hive hive-a (40.0 MB)"


def test_model_download_failure_is_one_line(rbee: Any, queen: Any) -> None:
    queen.job_events["model_download"] = [
        {"type": "error", "message": "404 from the hub: no such repo"}
    ]

    result = rbee("model", "download", "org/nope:file.gguf")

    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == "rbee: 404 from the hub: no such repo"
