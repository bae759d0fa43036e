"""The figures of a run: throughputs, latency statistics, goodput and failures by error code.

The names and definitions follow vLLM's benchmark (`mean_ttft_ms`, `p99_tpot_ms`, `request_goodput`, ...) so
that a figure measured here can be set beside one from `vllm bench serve`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from gateway.benchmark.client import RequestOutput
from gateway.benchmark.datasets import TokenCounter

METRICS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """SLOs in milliseconds from `KEY:VALUE` pairs, e.g. `ttft:500 tpot:50`."""
    slos = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput takes KEY:VALUE pairs with KEY one of {', '.join(GOODPUT_METRICS)}: {pair!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput value is not a number of milliseconds: {pair!r}") from None
        if slos[name] < 0:
            raise ValueError(f"--goodput value must not be negative: {pair!r}")
    return slos


def parse_percentiles(text: str) -> list[float]:
    values = [float(p) for p in text.split(",") if p.strip()]
    if not values or any(not 0 <= p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles takes numbers in [0, 100], comma-separated: {text!r}")
    return values


def percentile_key(p: float) -> str:
    return f"p{int(p) if p == int(p) else p}"


def percentile(ordered: Sequence[float], p: float) -> float:
    """Linear interpolation between the closest ranks, as numpy's default does."""
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def tpot_of(output: RequestOutput) -> float | None:
    """Time per output token after the first; None when there is no second token to time."""
    if output.output_tokens > 1:
        return (output.latency - output.ttft) / (output.output_tokens - 1)
    return None


def count_output_tokens(outputs: Sequence[RequestOutput], counter: TokenCounter) -> None:
    """Fill in the output tokens of answers that came without `usage`: tokenizer, chunks, or estimate."""
    for output in outputs:
        if output.success and not output.usage_seen:
            if output.text is not None and (counter.exact or not output.content_chunks):
                output.output_tokens = counter.count(output.text)
            else:
                output.output_tokens = output.content_chunks


def _stats(name: str, values_s: list[float], percentiles: Sequence[float], into: dict[str, Any]) -> None:
    if not values_s:
        into[f"mean_{name}_ms"] = into[f"median_{name}_ms"] = into[f"std_{name}_ms"] = None
        for p in percentiles:
            into[f"{percentile_key(p)}_{name}_ms"] = None
        return
    values_s.sort()
    n = len(values_s)
    mean = math.fsum(values_s) / n
    into[f"mean_{name}_ms"] = mean * 1000
    into[f"median_{name}_ms"] = percentile(values_s, 50) * 1000
    into[f"std_{name}_ms"] = math.sqrt(math.fsum((v - mean) ** 2 for v in values_s) / n) * 1000
    for p in percentiles:
        into[f"{percentile_key(p)}_{name}_ms"] = percentile(values_s, p) * 1000


def peak_concurrency(outputs: Sequence[RequestOutput]) -> int:
    """The most requests in flight at once, from their start and end times."""
    edges = sorted(
        [(o.start, 1) for o in outputs if o.start] + [(o.start + o.latency, -1) for o in outputs if o.start],
        key=lambda e: (e[0], e[1]),
    )
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def send_rate(outputs: Sequence[RequestOutput]) -> float | None:
    """Requests sent a second, from the first send to the last: the load the tool actually offered."""
    starts = [o.start for o in outputs if o.start]
    if len(starts) < 2 or max(starts) == min(starts):
        return None
    return (len(starts) - 1) / (max(starts) - min(starts))


def summarize(
    outputs: Sequence[RequestOutput],
    duration: float,
    percentiles: Sequence[float],
    goodput: dict[str, float] | None = None,
    streamed: bool = True,
) -> dict[str, Any]:
    """The figures of one run, keyed as vLLM's result JSON is (latencies in milliseconds)."""
    ok = [o for o in outputs if o.success]
    ttfts = [o.ttft for o in ok]
    e2els = [o.latency for o in ok]
    tpots: list[float] = []
    itls: list[float] = []
    good = 0
    if streamed:
        for o in ok:
            if (tpot := tpot_of(o)) is not None:
                tpots.append(tpot)
            itls.extend(o.itl)
    if goodput:
        slos = {k: v / 1000 for k, v in goodput.items()}
        for o in ok:
            observed = {"ttft": o.ttft, "tpot": (tpot_of(o) or 0.0) if streamed else 0.0, "e2el": o.latency}
            good += all(observed[k] <= v for k, v in slos.items())
    total_input = sum(o.prompt_tokens for o in ok)
    total_output = sum(o.output_tokens for o in ok)
    duration = max(duration, 1e-9)
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "request_send_rate": send_rate(outputs),
        "request_goodput": good / duration if goodput else None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "peak_concurrency": peak_concurrency(outputs),
        "errors": dict(Counter(o.error for o in outputs if not o.success).most_common()),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        _stats(name, values, percentiles, summary)
    return summary
