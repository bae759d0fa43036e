"""PNG charts of a run (`--plot DIR`): latency CDFs, time to first token over time, throughput over time."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.benchmark.metrics import tpot_of
from gateway.benchmark.report import TargetRun


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable("--plot needs matplotlib: `pip install matplotlib` (or the project's `bench` extra)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values_ms: list[float], label: str) -> None:
    if not values_ms:
        return
    values_ms.sort()
    n = len(values_ms)
    ax.plot(values_ms, [(i + 1) / n for i in range(n)], label=label, drawstyle="steps-post")


def write_plots(directory: str, runs: Sequence[TargetRun]) -> list[Path]:
    """Write the charts into `directory` (made if missing) and return their paths."""
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latency_cdf.png", out / "ttft_over_time.png", out / "throughput_over_time.png"]

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (
        ("ttft", "Time to first token"),
        ("tpot", "Time per output token"),
        ("itl", "Inter-token latency"),
        ("e2el", "End-to-end latency"),
    )
    for ax, (name, title) in zip(axes.flat, panels, strict=True):
        for run in runs:
            ok = [o for o in run.outputs if o.success]
            if name == "ttft":
                values = [o.ttft * 1000 for o in ok]
            elif name == "tpot":
                values = [t * 1000 for o in ok if run.streamed and (t := tpot_of(o)) is not None]
            elif name == "itl":
                values = [v * 1000 for o in ok for v in o.itl]
            else:
                values = [o.latency * 1000 for o in ok]
            _cdf(ax, values, run.label)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if name != "itl" else "fraction of tokens")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="lower right")
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 5))
    for run in runs:
        ok = [o for o in run.outputs if o.success]
        ax.scatter([o.start - run.start for o in ok], [o.ttft * 1000 for o in ok], s=6, alpha=0.6, label=run.label)
    ax.set_title("Time to first token by request start time")
    ax.set_xlabel("request start (s since the run began)")
    ax.set_ylabel("TTFT (ms)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    fig, (ax_req, ax_tok) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for run in runs:
        duration = run.summary["duration_s"]
        # About 40 points a run, none shorter than 0.1 s, so that a short run does not turn into noise.
        width = max(duration / 40, 0.1)
        bins = int(duration / width) + 1
        requests = [0] * bins
        tokens = [0] * bins
        for o in run.outputs:
            if o.success:
                b = min(int((o.start + o.latency - run.start) / width), bins - 1)
                requests[b] += 1
                tokens[b] += o.output_tokens
        times = [(b + 0.5) * width for b in range(bins)]
        ax_req.plot(times, [r / width for r in requests], label=run.label)
        ax_tok.plot(times, [t / width for t in tokens], label=run.label)
    ax_req.set_title("Throughput over time (by completion time)")
    ax_req.set_ylabel("completed requests/s")
    ax_tok.set_ylabel("output tokens/s")
    ax_tok.set_xlabel("time since the run began (s)")
    for ax in (ax_req, ax_tok):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
