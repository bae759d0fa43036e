"""The simulator as operators start it: ``python -m gateway.simulator`` in its own process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

MODEL = "facebook/opt-125m"


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    command = [sys.executable, "-m", "gateway.simulator", "--port", "0", "--model", MODEL, "--ttft", "0.01"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        banner = process.stderr.readline()
        assert "simulator" in banner and "no model is loaded" in banner and MODEL in banner
        match = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        url = match.group(0)
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the simulator did not become healthy"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        # uvicorn shuts down cleanly, then re-raises the signal it caught.
        assert process.wait(timeout=10) in (0, -signal.SIGTERM)
        if process.stderr is not None:
            process.stderr.close()


def test_chat_through_the_openai_client(simulator_url: str) -> None:
    client = openai.OpenAI(base_url=f"{simulator_url}/v1", api_key="not-checked", max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=5
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 5

    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=5, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == answer.choices[0].message.content
    assert [model.id for model in client.models.list().data] == [MODEL]


def test_bad_options_are_refused() -> None:
    command = [sys.executable, "-m", "gateway.simulator", "--model", MODEL, "--ttft", "-1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "ttft, tpot and tpot_batch_factor cannot be negative" in result.stderr
