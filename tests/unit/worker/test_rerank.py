"""Reranking's pieces: the request check, the answer, llama.cpp's flags, a reranker file's facts,
and the queen's view of a reranker model (its refusal, its APIs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rbee.common.errors import BadRequest, RbeeError
from rbee.contracts.workers import WorkerInfo, WorkerStatus
from rbee.queen.api.rerank import not_a_reranker
from rbee.queen.live import apis_of
from rbee.worker.api.rerank import MAX_DOCUMENTS, check_rerank, ranked, refused
from rbee.worker.engines.gguf import read_model_facts
from rbee.worker.engines.llama_process import ServerConfig
from rbee_testing.gguf import write_tiny_gguf

GOOD = {"model": "r", "query": "what is a panda?", "documents": ["a bear", "a city"]}


def refusal(body: dict[str, Any]) -> RbeeError:
    with pytest.raises(RbeeError) as caught:
        check_rerank(body)
    assert caught.value.status_code == 400
    return caught.value


def test_a_good_request_gives_its_query_documents_and_options() -> None:
    body = {**GOOD, "top_n": 1, "return_documents": True}
    assert check_rerank(body) == ("what is a panda?", ["a bear", "a city"], 1, True)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"query": None}, "query"),
        ({"query": ""}, "query"),
        ({"query": 3}, "query"),
        ({"documents": None}, "documents"),
        ({"documents": []}, "documents"),
        ({"documents": "a bear"}, "documents"),
        ({"documents": ["a bear", {"text": "a city"}]}, "documents[1]"),
        ({"documents": ["a bear", ""]}, "documents[1]"),
        ({"top_n": 0}, "top_n"),
        ({"top_n": "2"}, "top_n"),
        ({"top_n": True}, "top_n"),
        ({"return_documents": "yes"}, "return_documents"),
    ],
)
def test_bad_input_is_400_naming_the_field(change: dict[str, Any], param: str) -> None:
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    assert refusal(body).param == param


def test_too_many_documents_is_400_saying_the_limit() -> None:
    error = refusal({**GOOD, "documents": ["d"] * (MAX_DOCUMENTS + 1)})
    assert error.code == "too_many_documents"
    assert str(MAX_DOCUMENTS) in error.message
    assert check_rerank({**GOOD, "documents": ["d"] * MAX_DOCUMENTS})[1] == ["d"] * MAX_DOCUMENTS


def test_a_field_it_cannot_honour_is_refused_not_dropped() -> None:
    error = refusal({**GOOD, "max_tokens_per_doc": 100})
    assert error.code == "unsupported_parameter"
    assert error.param == "max_tokens_per_doc"


def test_the_answer_names_the_worker_model_and_gives_documents_when_asked() -> None:
    answer = {
        "model": "/models/bge.gguf",
        "object": "list",
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
        "results": [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}],
    }
    plain = ranked(json.loads(json.dumps(answer)), "bge", ["a", "b"], False)
    assert plain["model"] == "bge"
    assert plain["results"] == answer["results"]
    with_text = ranked(json.loads(json.dumps(answer)), "bge", ["a", "b"], True)
    assert [r["document"] for r in with_text["results"]] == [{"text": "b"}, {"text": "a"}]


def test_a_document_past_the_context_is_context_length_exceeded_naming_ctx_size() -> None:
    llama = {
        "error": {
            "code": 400,
            "message": "request (508 tokens) exceeds the available context size (256 tokens)",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 508,
            "n_ctx": 256,
        }
    }
    error = refused(400, json.dumps(llama).encode(), 256)
    assert isinstance(error, BadRequest)
    assert error.code == "context_length_exceeded"
    assert "--ctx-size" in error.message
    assert "508" in error.message


def test_a_reranking_worker_starts_llama_server_with_reranking() -> None:
    config = ServerConfig(model=Path("r.gguf"), ctx_size=512, slots=1, threads=1, embedding=True)
    assert "--reranking" not in config.args(Path("s"))
    rerank = ServerConfig(
        model=Path("r.gguf"), ctx_size=512, slots=1, threads=1, embedding=True, rerank=True
    )
    args = rerank.args(Path("s"))
    assert "--reranking" in args
    assert "--embedding" in args


def test_a_file_that_pools_by_rank_is_a_reranker_and_an_embedding_model(tmp_path: Path) -> None:
    reranker = read_model_facts(write_tiny_gguf(tmp_path / "r.gguf", pooling=4))
    assert reranker.reranker
    assert reranker.embedding_model
    encoder = read_model_facts(write_tiny_gguf(tmp_path / "e.gguf", pooling=1))
    assert not encoder.reranker
    assert not read_model_facts(write_tiny_gguf(tmp_path / "g.gguf")).reranker


def worker(name: str, *, embedding: bool = False, rerank: bool = False) -> WorkerInfo:
    return WorkerInfo(
        id=name,
        model_id="m",
        port=1,
        status=WorkerStatus.READY,
        version="1",
        embedding=embedding,
        rerank=rerank,
    )


def test_the_queen_refuses_rerank_for_a_model_whose_workers_do_not_rerank() -> None:
    error = not_a_reranker("m", [worker("c"), worker("e", embedding=True)])
    assert error is not None
    assert error.code == "model_not_reranker"
    assert error.param == "model"
    assert not_a_reranker("m", [worker("r", embedding=True, rerank=True)]) is None
    assert not_a_reranker("m", []) is None  # not known yet: a worker started for it will say


def test_a_reranker_model_lists_rerank_and_not_embeddings() -> None:
    assert apis_of(1, 1, 1) == ["rerank"]
    assert "rerank" not in apis_of(1, 1, 0)
    assert "rerank" not in apis_of(0, 0, 0)  # unknown until one of its workers says
    assert apis_of(2, 1, 1) == [
        "chat.completions",
        "completions",
        "messages",
        "responses",
        "rerank",
    ]
