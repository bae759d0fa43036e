"""A small batch answered by a real vLLM on the CPU: through its server, and through its offline batch runner."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support import TOKEN, api_url, endpoint, gateway

from .conftest import VllmServer, _model_dir, _venv_dir

HEADERS = {"authorization": f"Bearer {TOKEN}"}
FINISHED = ("completed", "failed", "cancelled", "expired")


def chat_line(index: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"Tell me about robot number {index}."}],
        "max_tokens": 5,
        "ignore_eos": True,
    }


def run(server: Any, source: Path, output: Path, model: str, timeout: float) -> dict[str, Any]:
    response = httpx.post(
        f"{api_url(server)}/batches",
        headers=HEADERS,
        json={"input_file_path": str(source), "output_folder_path": str(output), "model": model},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    batch_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while True:
        batch: dict[str, Any] = httpx.get(f"{api_url(server)}/batches/{batch_id}", headers=HEADERS, timeout=60).json()
        if batch["status"] in FINISHED or time.monotonic() > deadline:
            return batch
        time.sleep(0.5)


def read(folder: Path, name: str) -> dict[int, dict[str, Any]]:
    path = folder / name
    if not path.exists():
        return {}
    return {item["line"]: item for item in map(json.loads, path.read_text().splitlines())}


def test_a_small_batch_through_the_gateway_to_vllm(vllm_server: VllmServer, tmp_path: Path) -> None:
    lines = [json.dumps(chat_line(index)) for index in range(6)]
    lines.append(json.dumps({"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}))
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000}))
    source = tmp_path / "input.jsonl"
    source.write_text("".join(line + "\n" for line in lines))
    config = {
        "auth": {"providers": ["dev"]},
        "endpoints": [endpoint(vllm_server.base_url, [vllm_server.model])],
        "batches": {"allowed_roots": [str(tmp_path)], "concurrency": 4, "poll_interval": 0.5},
    }
    with gateway(config, tmp_path) as server:
        batch = run(server, source, tmp_path / "out", vllm_server.model, timeout=300)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 8, "completed": 7, "failed": 1}
    folder = tmp_path / "out" / batch["id"]
    results = read(folder, "results.jsonl")
    for line in range(1, 7):
        body = results[line]["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 5
    assert results[7]["response"]["body"]["usage"]["completion_tokens"] == 4
    assert read(folder, "errors.jsonl")[8]["response"]["status_code"] == 400


def test_the_offline_runner_answers_a_batch_with_vllm_run_batch(vllm_server: VllmServer, tmp_path: Path) -> None:
    lines = [json.dumps(chat_line(index)) for index in range(4)]
    # vLLM's runner answers chat and embeddings only: a completion is refused before it reaches the runner.
    lines.append(json.dumps({"prompt": "Once upon a time", "max_tokens": 4}))
    source = tmp_path / "input.jsonl"
    source.write_text("".join(line + "\n" for line in lines))
    venv = _venv_dir()
    runner = [
        str(venv / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        "{input}",
        "-o",
        "{output}",
        "--model",
        str(_model_dir()),
        "--served-model-name",
        "{model}",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "1024",
        "--enforce-eager",
    ]
    environment = {
        "VIRTUAL_ENV": str(venv),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
    }
    config = {
        "auth": {"providers": ["dev"]},
        "endpoints": [
            {
                "cluster": "offline",
                "framework": "vllm",
                "models": [vllm_server.model],
                "transport": "parsl",
                # Never started: the runner loads the model itself.
                "worker_model_server": {"command": ["{python}", "-m", "gateway.simulator", "--port", "{port}"]},
                "parsl": {"provider": "local", "max_workers_per_node": 1},
            }
        ],
        "batches": {
            "allowed_roots": [str(tmp_path)],
            "poll_interval": 0.5,
            "clusters": {"offline": {"offline_runner": {"command": runner, "env": environment, "chunk_lines": 4}}},
        },
    }
    with gateway(config, tmp_path) as server:
        batch = run(server, source, tmp_path / "out", vllm_server.model, timeout=600)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    folder = tmp_path / "out" / batch["id"]
    results = read(folder, "results.jsonl")
    assert sorted(results) == [1, 2, 3, 4]
    assert all(item["response"]["body"]["usage"]["completion_tokens"] == 5 for item in results.values())
    assert read(folder, "errors.jsonl")[5]["error"]["code"] == "operation_not_supported"
