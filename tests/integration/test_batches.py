"""Batches as a scientist runs them: a JSONL file in, answers out, through a real gateway process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer, free_port
from gateway.simulator import command as simulator_command
from tests.databases import database_settings
from tests.globus_fake import FakeGlobus
from tests.support import TOKEN, api_url, endpoint, gateway, simulator

MODEL = "facebook/opt-125m"
HEADERS = {"authorization": f"Bearer {TOKEN}"}
FINISHED = ("completed", "failed", "cancelled", "expired")


def question(index: int, **extra: Any) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"Question {index}?"}], "max_tokens": 4, **extra})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def answered(folder: Path, name: str = "results.jsonl") -> list[int]:
    path = folder / name
    return [json.loads(line)["line"] for line in path.read_text().splitlines()] if path.exists() else []


def submit(server: ModelServer, token: str = TOKEN, **body: Any) -> httpx.Response:
    return httpx.post(f"{api_url(server)}/batches", headers={"authorization": f"Bearer {token}"}, json=body, timeout=30)


def cancel_unfinished(server: ModelServer) -> None:
    """Cancel the user's batches that are not finished, and wait until they are."""
    listed = httpx.get(f"{api_url(server)}/batches", headers=HEADERS, timeout=30).json()["data"]
    for batch in listed:
        if batch["status"] not in FINISHED:
            httpx.post(f"{api_url(server)}/batches/{batch['id']}/cancel", headers=HEADERS, timeout=30)
            wait_for(server, batch["id"])


def status(server: ModelServer, batch_id: str, token: str = TOKEN) -> dict[str, Any]:
    response = httpx.get(
        f"{api_url(server)}/batches/{batch_id}", headers={"authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


def wait_for(server: ModelServer, batch_id: str, done: Any = None, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch = status(server, batch_id)
        if (done(batch) if done else batch["status"] in FINISHED) or time.monotonic() > deadline:
            return batch
        time.sleep(0.2)


def batch_settings(root: Path, **extra: Any) -> dict[str, Any]:
    return {"allowed_roots": [str(root)], "slice_seconds": 2, "poll_interval": 0.2, **extra}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGlobus]:
    with FakeGlobus() as server:
        yield server


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    with simulator("--max-model-len", "4096") as server:
        yield server


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, database: dict[str, Any]) -> Path:
    # One per database: the tests write to fixed folders under it.
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The gateway's database settings: its own SQLite file, or a scratch database on the machine's PostgreSQL."""
    with database_settings(request.param) as settings:
        yield settings


@pytest.fixture(scope="module")
def front(
    backend: ModelServer,
    fake: FakeGlobus,
    root: Path,
    database: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ModelServer]:
    config = {
        "auth": {"providers": ["dev", "globus"], "globus": {"timeout": 2.0}},
        "endpoints": [endpoint(backend.base_url, [MODEL])],
        "batches": batch_settings(root, max_lines=20_000, max_upload_bytes=64 * 1024),
        "database": database,
    }
    with gateway(config, tmp_path_factory.mktemp("batches"), env=fake.gateway_env()) as server:
        yield server


def test_the_usage_guide_batch_answers_every_line_and_lists_the_bad_ones(front: ModelServer, root: Path) -> None:
    lines = [
        question(0),
        "this is not JSON",
        "",
        json.dumps(
            {
                "custom_id": "req-7",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            }
        ),
        json.dumps(["a", "list"]),
        json.dumps({"model": "some/other-model", "messages": [{"role": "user", "content": "Hi"}]}),
        json.dumps({"prompt": "The future of AI is", "max_tokens": 5}),
        question(7, max_tokens=100_000),
        json.dumps({"custom_id": "req-9", "method": "POST", "url": "/v1/files", "body": {}}),
        question(9),
    ]
    source = write_lines(root / "guide" / "input.jsonl", lines)
    response = submit(front, input_file_path=str(source), output_folder_path=str(root / "guide" / "out"), model=MODEL)
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["object"] == "batch" and created["status"] in ("queued", "in_progress")
    assert created["request_counts"]["total"] == 9

    batch = wait_for(front, created["id"])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 9, "completed": 4, "failed": 5}
    assert batch["output_file_id"] and batch["error_file_id"]
    folder = Path(batch["output_folder_path"]) / batch["id"]
    assert sorted(answered(folder)) == [1, 4, 7, 10]
    errors = {item["line"]: item for item in map(json.loads, (folder / "errors.jsonl").read_text().splitlines())}
    assert {line: item["error"]["code"] for line, item in errors.items()} == {
        2: "invalid_json",
        5: "invalid_line",
        6: "model_mismatch",
        8: "http_400",
        9: "invalid_url",
    }
    assert errors[8]["response"]["status_code"] == 400 and errors[9]["custom_id"] == "req-9"
    results = {item["line"]: item for item in map(json.loads, (folder / "results.jsonl").read_text().splitlines())}
    assert results[4]["custom_id"] == "req-7" and results[4]["response"]["status_code"] == 200
    assert results[7]["response"]["body"]["object"] == "text_completion"
    assert results[1]["response"]["body"]["choices"][0]["message"]["content"]

    download = httpx.get(f"{api_url(front)}/batches/{batch['id']}/result", headers=HEADERS, timeout=30)
    assert download.status_code == 200 and len(download.text.splitlines()) == 4
    listed = httpx.get(f"{api_url(front)}/batches", headers=HEADERS, params={"status": "completed"}, timeout=30)
    assert batch["id"] in [item["id"] for item in listed.json()["data"]]


def test_paths_must_resolve_inside_the_allowed_roots(front: ModelServer, root: Path, tmp_path: Path) -> None:
    outside = write_lines(tmp_path / "secret" / "input.jsonl", [question(0)])
    inside = write_lines(root / "paths" / "input.jsonl", [question(0)])
    (root / "paths" / "link-in").symlink_to(outside)
    (root / "paths" / "link-out").symlink_to(tmp_path / "secret", target_is_directory=True)
    out = str(root / "paths" / "out")
    # root and tmp_path are siblings: root/paths/../.. is their parent.
    cases = [
        ({"input_file_path": f"{root}/paths/../../{tmp_path.name}/secret/input.jsonl"}, "input"),
        ({"input_file_path": str(root / "paths" / "link-in")}, "input"),
        ({"input_file_path": str(inside), "output_folder_path": str(root / "paths" / "link-out")}, "output"),
        ({"input_file_path": str(inside), "output_folder_path": str(root / "paths" / "link-out" / "deeper")}, "output"),
        ({"input_file_path": str(inside), "output_folder_path": f"{root}/paths/../../escape"}, "output"),
    ]
    for body, which in cases:
        response = submit(front, model=MODEL, **{"output_folder_path": out, **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["code"] in ("path_not_allowed", "file_not_found"), error
        assert error["param"] == ("input_file_path" if which == "input" else "output_folder_path")
        if error["code"] == "path_not_allowed":
            assert f"folders batches may use here: {root.resolve()}." in error["message"], error
    relative = submit(front, model=MODEL, input_file_path="paths/input.jsonl", output_folder_path=out)
    assert relative.status_code == 400 and relative.json()["error"]["code"] == "invalid_path"
    assert sorted(path.name for path in (tmp_path / "secret").iterdir()) == ["input.jsonl"]
    assert not (root.parent / "escape").exists()


def test_another_users_batch_is_not_theirs(front: ModelServer, root: Path, fake: FakeGlobus) -> None:
    source = write_lines(root / "mine" / "input.jsonl", [question(index) for index in range(3)])
    # ``input_file`` is the other name the usage guide's users give the input path.
    mine = submit(front, input_file=str(source), output_folder_path=str(root / "mine" / "out"), model=MODEL)
    batch_id = mine.json()["id"]
    stranger = {"authorization": f"Bearer {fake.issue('jdoe@anl.gov')}"}
    base = api_url(front)
    for method, path in [
        ("GET", f"/batches/{batch_id}"),
        ("POST", f"/batches/{batch_id}/cancel"),
        ("GET", f"/batches/{batch_id}/result"),
    ]:
        response = httpx.request(method, f"{base}{path}", headers=stranger, timeout=30)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "batch_not_found"
    listed = httpx.get(f"{base}/batches", headers=stranger, timeout=30).json()
    assert batch_id not in [item["id"] for item in listed["data"]]
    batch = wait_for(front, batch_id)
    file_id = batch["output_file_id"]
    assert httpx.get(f"{base}/files/{file_id}/content", headers=stranger, timeout=30).status_code == 404
    assert httpx.get(f"{base}/files/{file_id}/content", headers=HEADERS, timeout=30).status_code == 200


def test_too_many_lines_is_refused_at_submission(front: ModelServer, root: Path) -> None:
    source = write_lines(root / "big" / "input.jsonl", [question(index) for index in range(20_001)])
    response = submit(front, input_file_path=str(source), output_folder_path=str(root / "big" / "out"), model=MODEL)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "too_many_lines" and "20000" in error["message"]


def test_the_openai_sdk_uploads_a_file_runs_a_batch_and_reads_its_output(front: ModelServer, tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {
                "custom_id": f"task-{index}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Say {index}"}], "max_tokens": 3},
            }
        )
        for index in range(20)
    ]
    source = write_lines(tmp_path / "requests.jsonl", [*lines, "{broken"])
    with openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0) as client:
        uploaded = client.files.create(file=source.open("rb"), purpose="batch")
        assert uploaded.bytes == source.stat().st_size and uploaded.filename == "requests.jsonl"
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "1"}
        )
        assert batch.endpoint == "/v1/chat/completions" and batch.metadata == {"run": "1"}
        deadline = time.monotonic() + 60
        while batch.status not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed"
        assert batch.request_counts is not None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (21, 20, 1)
        assert batch.output_file_id and batch.error_file_id
        output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(item["custom_id"] for item in output) == sorted(f"task-{index}" for index in range(20))
        assert all(item["response"]["status_code"] == 200 and item["error"] is None for item in output)
        errors = client.files.content(batch.error_file_id).text.splitlines()
        assert json.loads(errors[0])["line"] == 21
        assert batch.id in [item.id for item in client.batches.list(limit=5)]
        with pytest.raises(openai.BadRequestError):
            client.batches.cancel(batch.id)
        with pytest.raises(openai.APIStatusError) as too_big:
            client.files.create(file=("big.jsonl", b"x" * (65 * 1024)), purpose="batch")
        assert too_big.value.status_code == 413


def test_an_upload_that_names_no_model_says_where_to_name_it(front: ModelServer, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "guide.jsonl", [question(0), question(1)])
    with openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0) as client:
        uploaded = client.files.create(file=source.open("rb"), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert "body.model" in refused.value.message and "extra_body" in refused.value.message
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"model": MODEL},
        )
        batch = client.batches.retrieve(wait_for(front, batch.id)["id"])
        assert batch.status == "completed" and batch.request_counts and batch.request_counts.completed == 2


def test_the_batch_commands_without_a_gateway_print_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MY_TOKEN": TOKEN}
    for verb in (
        ["status", "batch_x"],
        ["results", "batch_x"],
        ["submit", "in.jsonl", "--output", "out", "--model", MODEL],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "batch", *verb, "--url", url],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"error: no gateway answers at {url}/resource_server/v1 (ConnectError): start one with "
            "`inference-gateway serve`, or give its address with --url."
        ]


def test_an_uploaded_file_is_deleted_with_the_sdk_and_gone_from_disk(front: ModelServer, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "requests.jsonl", [question(0)])
    files = Path(front.env["INFERENCE_GATEWAY_STATE_DIR"]) / "files"
    with openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0) as client:
        uploaded = client.files.create(file=source.open("rb"), purpose="batch")
        assert (files / f"{uploaded.id}.jsonl").exists()
        deleted = client.files.delete(uploaded.id)
        assert deleted.id == uploaded.id and deleted.deleted
        assert not (files / f"{uploaded.id}.jsonl").exists()
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            client.files.delete(uploaded.id)


def test_the_command_line_submits_waits_and_collects(front: ModelServer, root: Path) -> None:
    source = write_lines(root / "cli" / "input.jsonl", [question(index) for index in range(50)])
    env = {**os.environ, "MY_TOKEN": TOKEN}
    url = f"http://127.0.0.1:{front.port}"
    command = [sys.executable, "-m", "gateway.cli", "batch"]
    submitted = subprocess.run(
        [
            *command,
            "submit",
            str(source),
            "--output",
            str(root / "cli" / "out"),
            "--model",
            MODEL,
            "--url",
            url,
            "--wait",
            "--interval",
            "0.2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.split()[0]
    assert "completed  50 answered, 0 failed, 50 in all" in submitted.stdout
    assert "line" in submitted.stderr  # the progress bar
    target = root / "cli" / "results.jsonl"
    results = subprocess.run(
        [*command, "results", batch_id, "--url", url, "-o", str(target)], env=env, timeout=60, check=False
    )
    assert results.returncode == 0 and len(target.read_text().splitlines()) == 50
    shown = subprocess.run(
        [*command, "status", batch_id, "--url", url, "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert json.loads(shown.stdout)["status"] == "completed"
    refused = subprocess.run(
        [*command, "cancel", batch_id, "--url", url], capture_output=True, text=True, env=env, timeout=60
    )
    assert refused.returncode != 0 and "cannot be cancelled" in refused.stderr


@pytest.fixture(scope="module")
def slow_front(
    tmp_path_factory: pytest.TempPathFactory, root: Path, database: dict[str, Any]
) -> Iterator[tuple[ModelServer, Path]]:
    # 20 ms a request and 8 in flight: about 400 lines a second, slow enough to act in the middle of a batch.
    with simulator("--ttft", "0.02") as backend:
        config = {
            "auth": {"providers": ["dev"]},
            "endpoints": [endpoint(backend.base_url, [MODEL])],
            "batches": batch_settings(root, concurrency=8, max_active_per_user=2),
            "database": database,
        }
        with gateway(config, tmp_path_factory.mktemp("slow")) as server:
            yield server, root


def test_cancel_stops_the_batch_within_seconds_and_keeps_what_was_done(
    slow_front: tuple[ModelServer, Path],
) -> None:
    server, root = slow_front
    source = write_lines(root / "cancel" / "input.jsonl", [question(index) for index in range(5000)])
    batch_id = submit(server, input_file_path=str(source), output_folder_path=str(root / "cancel"), model=MODEL).json()[
        "id"
    ]
    wait_for(server, batch_id, lambda batch: batch["request_counts"]["completed"] >= 200)
    began = time.monotonic()
    cancelled = httpx.post(f"{api_url(server)}/batches/{batch_id}/cancel", headers=HEADERS, timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelling"
    batch = wait_for(server, batch_id, timeout=20)
    assert batch["status"] == "cancelled" and time.monotonic() - began < 5
    folder = root / "cancel" / batch_id
    done = answered(folder)
    assert len(done) == len(set(done)) == batch["request_counts"]["completed"] < 5000
    time.sleep(1)
    assert len(answered(folder)) == len(done)
    assert batch["cancelled_at"] and batch["output_file_id"]


def test_the_active_batches_of_a_user_are_limited(slow_front: tuple[ModelServer, Path]) -> None:
    server, root = slow_front
    source = write_lines(root / "limit" / "input.jsonl", [question(index) for index in range(3000)])
    ids = []
    for _ in range(2):
        response = submit(server, input_file_path=str(source), output_folder_path=str(root / "limit"), model=MODEL)
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    third = submit(server, input_file_path=str(source), output_folder_path=str(root / "limit"), model=MODEL)
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "too_many_active_batches"
    for batch_id in ids:
        httpx.post(f"{api_url(server)}/batches/{batch_id}/cancel", headers=HEADERS, timeout=30)
    for batch_id in ids:
        assert wait_for(server, batch_id)["status"] == "cancelled"
    assert (
        submit(server, input_file_path=str(source), output_folder_path=str(root / "limit"), model=MODEL).status_code
        == 200
    )


def test_simultaneous_submissions_cannot_pass_the_active_batch_limit_together(
    slow_front: tuple[ModelServer, Path],
) -> None:
    server, root = slow_front
    cancel_unfinished(server)
    source = write_lines(root / "together" / "input.jsonl", [question(index) for index in range(3000)])
    with ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(
                lambda _: submit(
                    server, input_file_path=str(source), output_folder_path=str(root / "together"), model=MODEL
                ),
                range(6),
            )
        )
    accepted = [response.json()["id"] for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code == 429]
    assert len(accepted) == 2 and len(refused) == 4, [response.text for response in responses]
    for batch_id in accepted:
        httpx.post(f"{api_url(server)}/batches/{batch_id}/cancel", headers=HEADERS, timeout=30)
    for batch_id in accepted:
        wait_for(server, batch_id)


def test_the_input_of_a_running_batch_cannot_be_deleted(slow_front: tuple[ModelServer, Path], tmp_path: Path) -> None:
    server, _ = slow_front
    cancel_unfinished(server)
    lines = [
        json.dumps({"custom_id": str(index), "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}})
        for index in range(20000)
    ]  # fmt: skip
    # Fifty seconds of work at the front's pace: still running when the delete and the cancel arrive on a busy machine.
    source = write_lines(tmp_path / "running.jsonl", lines)
    with openai.OpenAI(base_url=api_url(server), api_key=TOKEN, max_retries=0) as client:
        uploaded = client.files.create(file=source.open("rb"), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.delete(uploaded.id)
        assert refused.value.code == "file_in_use" and batch.id in refused.value.message
        client.batches.cancel(batch.id)
        assert wait_for(server, batch.id)["status"] == "cancelled"
        assert client.files.delete(uploaded.id).deleted


def holder_of(lock: Path, parsl_run: str) -> int | None:
    """The worker that has ``lock`` open, if it belongs to the worker pool of Parsl run ``parsl_run`` (``001``...)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not any(os.readlink(fd) == str(lock) for fd in (entry / "fd").iterdir()):
                continue
            stat = (entry / "stat").read_text()
            parent = stat[stat.rfind(")") + 2 :].split()[1]
            if f"/parsl/{parsl_run}/".encode() in Path(f"/proc/{parent}/cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    return None


def parsl_config(root: Path) -> dict[str, Any]:
    launch = simulator_command(MODEL, options=("--ttft", "0.01"))
    return {
        "auth": {"providers": ["dev"]},
        "endpoints": [
            {
                "cluster": "local",
                "framework": "vllm",
                "models": [MODEL],
                "transport": "parsl",
                "worker_model_server": {"command": launch, "startup_timeout": 60, "idle_timeout": 60},
                # Quick heartbeats: the workers of a killed gateway notice and leave within seconds.
                "parsl": {
                    "provider": "local",
                    "max_workers_per_node": 2,
                    "heartbeat_period": 1,
                    "heartbeat_threshold": 4,
                },
            }
        ],
        "batches": batch_settings(root, concurrency=16),
    }


def test_10000_lines_through_parsl_survive_a_killed_gateway_and_a_killed_worker(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    source = write_lines(root / "input.jsonl", [question(index) for index in range(10_000)])
    config = parsl_config(root)
    with gateway(config, tmp_path) as first:
        batch_id = submit(first, input_file_path=str(source), output_folder_path=str(root / "out"), model=MODEL).json()[
            "id"
        ]
        seen = wait_for(first, batch_id, lambda batch: batch["request_counts"]["completed"] >= 1500, timeout=90)
        assert seen["status"] == "in_progress", seen
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
    folder = root / "out" / batch_id
    at_kill = len(answered(folder))
    assert 1500 <= at_kill < 10_000
    with gateway(config, tmp_path) as second:
        # Then one of the new gateway's workers is lost in the middle of a slice (the killed gateway's worker may
        # still finish its own slice first): Parsl starts another, and the gateway sends the next slice to it.
        deadline = time.monotonic() + 90
        while (worker := holder_of(folder / "lock", "001")) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        batch = wait_for(second, batch_id, timeout=120)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 10_000, "completed": 10_000, "failed": 0}
    done = answered(folder)
    assert len(done) == 10_000 and sorted(done) == list(range(1, 10_001))
    assert not (folder / "errors.jsonl").read_text()
