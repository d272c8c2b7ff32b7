#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU, its driver and the CUDA toolkit (nvcc):
#   bench/gpu_check.sh [MODEL]        (default: smollm2-135m-instruct)
# ./dev builds llama-server with CUDA there by itself; this starts a one-machine cluster (queen,
# hive) with one worker on cuda:0 and one on cpu:0, asks each the same question, and prints the
# tokens/s of each and the VRAM the GPU worker's processes hold (from NVML).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-smollm2-135m-instruct}
nvidia-smi -L >/dev/null 2>&1 || { echo "gpu_check: no working NVIDIA driver (nvidia-smi -L failed)" >&2; exit 1; }
./dev install
bin=.venv/bin hive_port=${HIVE_PORT:-17835}
hive=http://127.0.0.1:$hive_port
export RBEE_QUEEN_URL=http://127.0.0.1:${QUEEN_PORT:-17833} RBEE_STATE_DIR
RBEE_STATE_DIR=$(mktemp -d)
stop() {  # workers outlive their hive by design: stop them through the queen first
  local id
  for id in $("$bin/rbee" worker list --json 2>/dev/null | "$bin/python" -c 'import json, sys
print(" ".join(w["id"] for w in json.load(sys.stdin)["workers"]))'); do
    "$bin/rbee" worker stop "$id" >/dev/null 2>&1 || true
  done
  "$bin/rbee" hive stop --port "$hive_port" >/dev/null 2>&1 || true
  "$bin/rbee" queen stop >/dev/null 2>&1 || true
  rm -rf "$RBEE_STATE_DIR"
}
trap stop EXIT
"$bin/rbee" queen start
"$bin/rbee" hive start --port "$hive_port" --worker-ports "${WORKER_PORTS:-17840-17859}" --heartbeat-interval 2
for _ in $(seq 30); do  # until the hive has told the queen it is there
  "$bin/python" -c 'import os, httpx, sys; sys.exit(not httpx.get(os.environ["RBEE_QUEEN_URL"] + "/v1/hives").json()["hives"])' && break
  sleep 1
done
"$bin/rbee" worker spawn -m "$model" --device cuda:0
"$bin/rbee" worker spawn -m "$model" --device cpu:0
"$bin/python" - "$model" "$hive" <<'EOF'
import os, sys, time

import httpx, psutil, pynvml

from rbee.contracts.workers import WorkerView

model, hive = sys.argv[1], sys.argv[2]
queen = httpx.Client(base_url=os.environ["RBEE_QUEEN_URL"])
pids = {w["worker_id"]: w["pid"] for w in httpx.get(f"{hive}/v1/workers").json()["workers"]}
question = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
print(f"{model}, {len(question[0]['content'])}-character question, greedy")
for worker in map(WorkerView.model_validate, queen.get("/v1/workers").json()["workers"]):
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        answer = httpx.post(f"{worker.url}/v1/chat/completions", timeout=300, json={
            "model": model, "messages": question, "max_tokens": 256, "temperature": 0})
        answer.raise_for_status()
        rates.append(answer.json()["usage"]["completion_tokens"] / (time.perf_counter() - start))
    line = f"{worker.device:8} tokens/s: {min(rates):7.1f} min {max(rates):7.1f} max (3 runs, 256 tokens max)"
    if worker.device.startswith("cuda:"):
        pid = pids[worker.id]  # the worker and its llama-server
        ours = {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(worker.device.split(":")[1]))
        used = sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid in ours)
        line += f"   VRAM held: {used / 2**20:.0f} MiB"
    print(line)
EOF
