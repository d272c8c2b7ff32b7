"""Throughput and time to first token: the worker's HTTP API against llama-cpp-python in-process.

Same model file, same threads, same prompt, greedy decoding so both produce the same tokens.
The two are run alternately (never at once, which would split the cores) and medians are
reported. Targets: throughput ratio >= 0.95 and first-token overhead <= 5 ms.

    .venv/bin/python bench/worker_bench.py [--model smollm2-135m-instruct] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rbee.testing.processes import ServerProcess, console_script, free_port
from rbee.worker.app import default_model_id, resolve_model

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Run:
    ttft_s: float  # request sent → first generated text
    tokens: int
    decode_s: float  # first text → last text

    @property
    def tokens_per_s(self) -> float:
        # The first token's time is the TTFT; the rate is over the ones after it.
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


def direct_run(llm: Any, max_tokens: int) -> Run:
    """The engine at its barest: template, tokenize, then llama-cpp-python's token generator.

    (`create_chat_completion(stream=True)` re-detokenizes the whole answer at every token, so
    it would slow the baseline down and flatter the worker.)"""
    from llama_cpp import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(eos),
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
    )
    started = time.perf_counter()
    formatted = formatter(messages=[{"role": "user", "content": PROMPT}])
    tokens = llm.tokenize(formatted.prompt.encode(), add_bos=False, special=True)
    first = last = 0.0
    produced = 0
    for token in llm.generate(tokens, temp=0.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or produced == max_tokens:
            break
        llm.detokenize([token])
        produced += 1
        last = time.perf_counter()
        first = first or last
    return Run(first - started, produced, last - first)


def worker_run(client: httpx.Client, model: str, max_tokens: int) -> Run:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first = last = 0.0
    pieces = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                pieces += 1
    return Run(first - started, pieces, last - first)


def summary(name: str, runs: list[Run]) -> tuple[float, float]:
    ttft = statistics.median(r.ttft_s for r in runs)
    rate = statistics.median(r.tokens_per_s for r in runs)
    tokens = statistics.median(r.tokens for r in runs)
    print(f"  {name:<22} {rate:8.1f} tok/s   TTFT {ttft * 1000:7.1f} ms   ({tokens:.0f} tokens)")
    return rate, ttft


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx-size", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    # OpenMP threads that spin-wait after their work would steal the cores from the other side
    # of the comparison (they run alternately in two processes); both sides get the same policy.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from llama_cpp import Llama

    path: Path = resolve_model(args.model)
    model_id = default_model_id(args.model)
    llm = Llama(
        model_path=str(path),
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    port = free_port()
    worker = ServerProcess(
        [
            console_script("llm-worker-rbee"),
            "--model",
            args.model,
            "--port",
            str(port),
            # Nobody listens there: the worker's heartbeats fail quietly and cost nothing here.
            "--queen-url",
            f"http://127.0.0.1:{free_port()}",
            "--threads",
            str(args.threads),
            "--ctx-size",
            str(args.ctx_size),
        ],
        health_url=f"http://127.0.0.1:{port}/health",
    )
    direct: list[Run] = []
    served: list[Run] = []
    with worker, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        # One warm-up each: page in the weights, fill both prompt caches the same way.
        direct_run(llm, 8)
        worker_run(client, model_id, 8)
        for _ in range(args.runs):
            direct.append(direct_run(llm, args.max_tokens))
            served.append(worker_run(client, model_id, args.max_tokens))
    llm.close()

    print(f"model {path.name}, {args.threads} threads, {args.max_tokens} max tokens, "
          f"{args.runs} runs each, medians:")  # fmt: skip
    direct_rate, direct_ttft = summary("llama-cpp-python", direct)
    worker_rate, worker_ttft = summary("llm-worker-rbee HTTP", served)
    ratio = worker_rate / direct_rate
    overhead_ms = (worker_ttft - direct_ttft) * 1000
    ok_rate, ok_ttft = ratio >= 0.95, overhead_ms <= 5.0
    print(
        f"  throughput ratio       {ratio:.3f}   (target >= 0.95: {'ok' if ok_rate else 'MISSED'})"
    )
    print(
        f"  first-token overhead   {overhead_ms:+.1f} ms (target <= 5 ms: {'ok' if ok_ttft else 'MISSED'})"
    )
    return 0 if ok_rate and ok_ttft else 1


if __name__ == "__main__":
    sys.exit(main())
