"""`rbee infer`: the answer streamed through the queen's OpenAI API."""

from __future__ import annotations

from typing import Any

from rbee.common.bundled import DEFAULT_SYSTEM_PROMPT


def test_infer_streams_the_answer_to_stdout(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct")

    result = rbee("infer", "What is the capital of France?")

    assert result.exit_code == 0, result.output
    assert result.stdout == "The capital of France is Paris.\n"
    sent = queen.chats[0]
    assert sent["stream"] is True
    assert sent["model"] == "smollm2-135m-instruct"
    assert sent["messages"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert sent["temperature"] == 0.0  # the same question gets the same answer
    assert sent["max_tokens"] == 512  # a rambling model ends within the minute
    assert sent["stream_options"] == {"include_usage": True}  # for the tokens/s line
    assert "tokens/s" in result.stderr, result.stderr


def test_infer_system_message_can_be_changed_or_dropped(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct")
    assert rbee("infer", "--system", "Answer in French.", "hi").exit_code == 0
    assert queen.chats[0]["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert rbee("infer", "--system", "", "hi").exit_code == 0
    assert queen.chats[1]["messages"] == [{"role": "user", "content": "hi"}]


def test_infer_passes_model_and_sampling_options(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct")
    queen.add_model("tinyllama")

    result = rbee("infer", "-m", "tinyllama", "hi", "--max-tokens", "12", "--temperature", "0.5")

    assert result.exit_code == 0
    assert queen.chats[0]["model"] == "tinyllama"
    assert queen.chats[0]["max_tokens"] == 12
    assert queen.chats[0]["temperature"] == 0.5


def test_no_stream_prints_the_whole_answer(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct")

    result = rbee("infer", "--no-stream", "What is the capital of France?")

    assert result.exit_code == 0
    assert result.stdout == "The capital of France is Paris.\n"
    assert queen.chats[0]["stream"] is False


def test_an_unknown_model_lists_the_models_that_exist(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct")
    queen.add_model("tinyllama", "available", workers=0)

    result = rbee("infer", "-m", "gpt-9", "hi")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "rbee: unknown model 'gpt-9' — the cluster knows: smollm2-135m-instruct, tinyllama"
    )


def test_without_model_the_only_loaded_one_is_used(rbee: Any, queen: Any) -> None:
    queen.add_model("tinyllama", "loaded")
    queen.add_model("phi", "available", workers=0)

    result = rbee("infer", "hi")

    assert result.exit_code == 0
    assert queen.chats[0]["model"] == "tinyllama"


def test_without_model_and_several_loaded_it_asks_to_choose(rbee: Any, queen: Any) -> None:
    queen.add_model("tinyllama")
    queen.add_model("phi")

    result = rbee("infer", "hi")

    assert result.exit_code == 1
    assert "several models are loaded (tinyllama, phi) — pick one with -m MODEL" in result.stderr
    assert queen.chats == []


def test_bad_options_are_refused_before_calling_the_queen(rbee: Any, queen: Any) -> None:
    result = rbee("infer", "hi", "--temperature", "7")

    assert result.exit_code == 2
    assert queen.chats == []


def test_an_answer_that_breaks_off_keeps_what_came_and_says_why(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct")
    queen.stream_error = "worker w-1 failed mid-answer"

    result = rbee("infer", "hi")

    assert result.exit_code == 1
    assert result.stdout == "The capital of France is Paris.\n"
    assert result.stderr == "rbee: the answer broke off: worker w-1 failed mid-answer\n"
