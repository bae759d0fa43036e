"""The load: when each request leaves, how many may be in flight, and the processes that send them."""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
import queue
import random
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import aiohttp

from gateway.benchmark.client import Api, RequestOutput, request_streamed, request_whole


@dataclass(slots=True)
class LoadPlan:
    """What one process sends, and how: the prebuilt bodies, their arrival times and the concurrency cap.

    `arrivals` are offsets in seconds from the start of the run (None sends everything at once); `indices` are
    the requests' places in the whole workload, so that the shares of several processes merge back in order.
    """

    url: str
    api: Api
    headers: dict[str, str]
    bodies: list[bytes]
    prompt_lens: list[int]
    indices: list[int]
    arrivals: list[float] | None
    max_concurrency: int | None
    stream: bool
    keep_text: bool = False
    verify_ssl: bool = True
    timeout: float = 3600.0

    def share(self, worker: int, workers: int) -> LoadPlan:
        """Every `workers`-th request from `worker` on, with its part of the concurrency cap."""
        cap = self.max_concurrency
        if cap is not None:
            cap = cap // workers + (1 if worker < cap % workers else 0)
        return LoadPlan(
            url=self.url,
            api=self.api,
            headers=self.headers,
            bodies=self.bodies[worker::workers],
            prompt_lens=self.prompt_lens[worker::workers],
            indices=self.indices[worker::workers],
            arrivals=None if self.arrivals is None else self.arrivals[worker::workers],
            max_concurrency=cap,
            stream=self.stream,
            keep_text=self.keep_text,
            verify_ssl=self.verify_ssl,
            timeout=self.timeout,
        )


@dataclass(slots=True)
class RunResult:
    """The outputs of a run in workload order, and when it started and ended (perf_counter seconds)."""

    outputs: list[RequestOutput]
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def arrival_offsets(count: int, rate: float, burstiness: float, seed: int) -> list[float] | None:
    """Send times for `count` requests at `rate` a second: Poisson arrivals, or gamma ones with `burstiness`.

    The intervals follow a gamma distribution of shape `burstiness` and mean 1/rate, as in vLLM's benchmark:
    1 is a Poisson process, lower is burstier, higher is more even. An infinite rate sends everything at once.
    The times are fixed before the run so that a late wake-up delays one request, not all the ones after it.
    """
    if rate == float("inf"):
        return None
    if rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    offsets = []
    t = 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.gammavariate(burstiness, theta)
    return offsets


async def drive(
    plan: LoadPlan,
    progress: MutableSequence[int],
    slot: int = 0,
    ready: Callable[[], None] | None = None,
) -> RunResult:
    """Send a plan's requests from this process's event loop, counting completions in `progress[slot]`.

    `ready` is called once the session exists and before the clock starts, to line up several processes.
    """
    connector = aiohttp.TCPConnector(
        limit=plan.max_concurrency or 0,
        ssl=plan.verify_ssl,
        ttl_dns_cache=None,
    )
    # No Accept-Encoding: a compressing server may hold chunks back to fill its blocks, which would skew ITL.
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=plan.timeout),
        skip_auto_headers=("Accept-Encoding",),
        auto_decompress=False,
    )
    outputs = [
        RequestOutput(index, prompt_len) for index, prompt_len in zip(plan.indices, plan.prompt_lens, strict=True)
    ]
    request = request_streamed if plan.stream else request_whole
    url, api, headers, bodies, keep_text = plan.url, plan.api, plan.headers, plan.bodies, plan.keep_text
    arrivals = plan.arrivals

    async def send(i: int) -> None:
        await request(session, url, bodies[i], headers, outputs[i], api, keep_text)
        progress[slot] += 1

    async with session:
        if ready is not None:
            ready()
        start = perf_counter()
        if plan.max_concurrency:
            pending = iter(range(len(outputs)))

            # A pool of senders that take the next request in order: the cap without a task per waiting request.
            async def sender() -> None:
                for i in pending:
                    if arrivals is not None and (delay := start + arrivals[i] - perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    await send(i)

            await asyncio.gather(*(sender() for _ in range(min(plan.max_concurrency, len(outputs)))))
        else:
            tasks = []
            for i in range(len(outputs)):
                if arrivals is not None and (delay := start + arrivals[i] - perf_counter()) > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(i)))
            await asyncio.gather(*tasks)
        end = perf_counter()
    return RunResult(outputs, start, end)


def run_async(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed: its event loop costs less per request."""
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: every in-flight request holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(plan: LoadPlan, workers: int = 1, show_progress: bool = True) -> RunResult:
    """Drive the plan from `workers` processes (the calling one when 1), with a progress bar, and merge."""
    total = len(plan.bodies)
    if workers <= 1:
        counts: MutableSequence[int] = [0]
        with progress_bar(total, counts, show_progress):
            result: RunResult = run_async(drive(plan, counts))
        return result
    ctx = multiprocessing.get_context("spawn")
    shared = ctx.Array("q", workers, lock=False)
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_worker_main, args=(plan.share(w, workers), shared, w, barrier, results), daemon=True)
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    parts: list[RunResult] = []
    with progress_bar(total, shared, show_progress):
        while len(parts) < workers:
            try:
                part = results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    raise RuntimeError("a benchmark worker process died before returning its results") from None
                continue
            if isinstance(part, BaseException):
                raise RuntimeError(f"a benchmark worker process failed: {part!r}") from part
            parts.append(part)
    for process in processes:
        process.join()
    outputs = sorted((o for part in parts for o in part.outputs), key=lambda o: o.index)
    return RunResult(outputs, min(p.start for p in parts), max(p.end for p in parts))


def _worker_main(
    plan: LoadPlan,
    progress: MutableSequence[int],
    slot: int,
    barrier: Any,
    results: Any,
) -> None:
    raise_open_file_limit()
    try:
        results.put(run_async(drive(plan, progress, slot, ready=barrier.wait)))
    except BaseException as exc:  # the parent reports it, and must not wait for results forever
        barrier.abort()
        results.put(exc)


@contextmanager
def progress_bar(total: int, counts: Sequence[int], enabled: bool) -> Iterator[None]:
    """A progress bar fed from completion counters, polled by a thread so that requests never wait for it."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    if importlib.util.find_spec("tqdm") is not None:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="req", dynamic_ncols=True)

        def update() -> None:
            shown = 0
            while not stop.wait(0.1):
                done = sum(counts)
                bar.update(done - shown)
                shown = done
            bar.update(sum(counts) - shown)
            bar.close()
    else:

        def update() -> None:
            began = time.monotonic()
            while not stop.wait(1.0):
                done = sum(counts)
                print(f"{done}/{total} requests, {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=update, name="benchmark-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
