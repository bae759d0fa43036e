"""``make demo-site``'s entry point: the printed ``curl`` line is answered, both clusters answer, and Ctrl-C leaves
nothing running.

The demo uses the test session's local Globus Compute service (``--use-running-service``): port 5000 takes one
service at a time. Everything else (the Slurm cluster, the endpoint daemon, the gateway, the blocks and model
servers) is the demo's own.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.globus_compute_service import ComputeService
from tests.support import MODEL, REPO, TOKEN


def started_by(root: Path, session: int) -> list[psutil.Process]:
    """What still runs of the demo: in its session, or from its folder (the Slurm daemons start sessions of their
    own)."""
    left = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session or str(root) in " ".join(process.cmdline()):
                left.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return left


def test_the_demo_answers_the_printed_curl_and_ctrl_c_leaves_nothing(compute_service: ComputeService) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "tests.demo_site", "--use-running-service"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()

    def next_line(starts: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise AssertionError(f"no line starting {starts!r}:\n" + "\n".join(output)) from None
            output.append(line)
            if line.startswith(starts):
                return line

    try:
        root = Path(next_line("demo folder: ").split(": ", 1)[1])
        slurm_conf = next_line("Slurm cluster: SLURM_CONF=").split("=", 1)[1].split()[0]
        gateway_url = next_line("gateway: ").split()[1]
        curl = next_line("curl ")

        done = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=180)
        answer = json.loads(done.stdout)
        assert answer["model"] == MODEL and answer["usage"]["completion_tokens"] == 30, done.stdout
        # Both clusters serve the model; each one named answers, from its own block in Slurm.
        headers = {"authorization": f"Bearer {TOKEN}"}
        for cluster in ("slurm-globus", "slurm-parsl"):
            named = httpx.post(
                f"{gateway_url}/resource_server/{cluster}/vllm/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                headers=headers,
                timeout=180,
            )
            assert named.status_code == 200, (cluster, named.text)
        squeue = subprocess.run(
            ["squeue", "--noheader", "--format=%j %T"],
            env={**os.environ, "SLURM_CONF": slurm_conf},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        blocks = [line for line in squeue if line.startswith("parsl.")]
        assert len(blocks) == 2 and all(line.endswith(" RUNNING") for line in blocks), squeue
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=180)
    next_line("stopped: ", timeout=5)
    assert code == 0, "\n".join(output)
    assert not root.exists()
    deadline = time.monotonic() + 30
    while left := started_by(root, demo.pid):
        assert time.monotonic() < deadline, f"left running: {[p.info if hasattr(p, 'info') else p for p in left]}"
        time.sleep(0.5)
