"""``inference-gateway batch ...``: submit, watch, cancel and collect batches on a running gateway over HTTP."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

FINISHED = ("completed", "failed", "cancelled", "expired")


class BatchClient:
    """The gateway's batch routes, for the command line."""

    def __init__(self, url: str, token: str, cluster: str | None = None, framework: str | None = None) -> None:
        route = f"{cluster}/{framework}/v1" if cluster and framework else "v1"
        self.base = f"{url.rstrip('/')}/resource_server/{route}"
        self.http = httpx.Client(headers={"authorization": f"Bearer {token}"}, timeout=60)

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """A gateway that cannot be reached is one line on stderr, not a traceback."""
        try:
            yield
        except httpx.TransportError as exc:
            raise SystemExit(
                f"error: no gateway answers at {self.base} ({type(exc).__name__}): start one with "
                "`inference-gateway serve`, or give its address with --url."
            ) from None

    def _json(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        with self._reaching():
            response = self.http.request(method, f"{self.base}{path}", **options)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise SystemExit(f"error: HTTP {response.status_code}: {message}")
        answer: dict[str, Any] = response.json()
        return answer

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/batches", json=body)

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/batches/{batch_id}")

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._json("POST", f"/batches/{batch_id}/cancel")

    def results(self, batch_id: str, which: str, target: Any) -> None:
        url = f"{self.base}/batches/{batch_id}/result"
        with self._reaching(), self.http.stream("GET", url, params={"file": which}) as response:
            if response.status_code >= 400:
                response.read()
                raise SystemExit(f"error: HTTP {response.status_code}: {response.text[:500]}")
            for chunk in response.iter_bytes():
                target.write(chunk)


def summary(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    line = (
        f"{batch['id']}  {batch['status']}  {counts['completed']} answered, {counts['failed']} failed, "
        f"{counts['total']} in all"
    )
    errors = (batch.get("errors") or {}).get("data") or []
    return line + "".join(f"\n  {error.get('code')}: {error.get('message')}" for error in errors)


def wait(client: BatchClient, batch_id: str, interval: float, bar: bool = True) -> dict[str, Any]:
    """Poll until the batch finishes, drawing a progress bar of answered lines on stderr."""
    from tqdm import tqdm

    batch = client.get(batch_id)
    with tqdm(total=batch["request_counts"]["total"] or None, unit="line", disable=not bar, file=sys.stderr) as meter:
        while True:
            counts = batch["request_counts"]
            meter.total = counts["total"] or meter.total
            meter.n = counts["completed"] + counts["failed"]
            meter.set_postfix_str(f"{batch['status']}, {counts['failed']} failed", refresh=False)
            meter.refresh()
            if batch["status"] in FINISHED:
                return batch
            time.sleep(interval)
            batch = client.get(batch_id)


def _client(args: argparse.Namespace) -> BatchClient:
    token = args.token or os.environ.get("MY_TOKEN")
    if not token:
        raise SystemExit("error: give --token or export MY_TOKEN (see `inference-gateway dev-token`)")
    return BatchClient(args.url, token, args.cluster, args.framework)


def _submit(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "input_file_path": str(Path(args.input).absolute()),
        "output_folder_path": str(Path(args.output).absolute()),
        "model": args.model,
    }
    if args.endpoint:
        body["endpoint"] = args.endpoint
    client = _client(args)
    batch = client.submit(body)
    print(batch["id"])
    if args.wait:
        batch = wait(client, batch["id"], args.interval)
        print(summary(batch))
        return 0 if batch["status"] == "completed" else 1
    return 0


def _status(args: argparse.Namespace) -> int:
    batch = _client(args).get(args.batch_id)
    print(json.dumps(batch, indent=2) if args.json else summary(batch))
    return 0


def _wait(args: argparse.Namespace) -> int:
    batch = wait(_client(args), args.batch_id, args.interval, bar=not args.quiet)
    print(summary(batch))
    return 0 if batch["status"] == "completed" else 1


def _cancel(args: argparse.Namespace) -> int:
    print(summary(_client(args).cancel(args.batch_id)))
    return 0


def _results(args: argparse.Namespace) -> int:
    client = _client(args)
    which = "errors" if args.errors else "results"
    if args.output:
        with open(args.output, "wb") as target:
            client.results(args.batch_id, which, target)
    else:
        client.results(args.batch_id, which, sys.stdout.buffer)
    return 0


def add_commands(commands: Any) -> None:
    """The ``batch`` command and its subcommands, under ``inference-gateway``."""
    batch = commands.add_parser("batch", help="submit, watch, cancel and collect batches on a running gateway")
    verbs = batch.add_subparsers(dest="verb", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)")
    common.add_argument("--token", default=None, help="bearer token (default: $MY_TOKEN)")
    common.add_argument("--cluster", default=None, help="with --framework: use that cluster's routes")
    common.add_argument("--framework", default=None)

    submit = verbs.add_parser("submit", parents=[common], help="submit a JSONL file of requests; prints the batch id")
    submit.add_argument("input", help="the JSONL input file (a path the gateway's workers can read)")
    submit.add_argument("--output", required=True, help="the folder for the results (inside an allowed root)")
    submit.add_argument("--model", required=True)
    submit.add_argument("--endpoint", default=None, help="e.g. /v1/chat/completions (default: each line's fields)")
    submit.add_argument("--wait", action="store_true", help="then wait for it, with a progress bar")
    submit.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    submit.set_defaults(run=_submit)

    status = verbs.add_parser("status", parents=[common], help="a batch's status and counts")
    status.add_argument("batch_id")
    status.add_argument("--json", action="store_true", help="the whole batch object")
    status.set_defaults(run=_status)

    waiting = verbs.add_parser("wait", parents=[common], help="wait for a batch to finish, with a progress bar")
    waiting.add_argument("batch_id")
    waiting.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    waiting.add_argument("--quiet", action="store_true", help="no progress bar")
    waiting.set_defaults(run=_wait)

    cancel = verbs.add_parser("cancel", parents=[common], help="cancel a batch; what it answered stays")
    cancel.add_argument("batch_id")
    cancel.set_defaults(run=_cancel)

    results = verbs.add_parser("results", parents=[common], help="download a batch's results (JSON lines)")
    results.add_argument("batch_id")
    results.add_argument("--errors", action="store_true", help="the errors file instead")
    results.add_argument("-o", "--output", default=None, help="write to this file (default: stdout)")
    results.set_defaults(run=_results)
