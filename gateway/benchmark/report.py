"""What a run leaves behind: the summary table, the side-by-side comparison, and the JSONL file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson

from gateway.benchmark.client import RequestOutput
from gateway.benchmark.metrics import METRICS, percentile_key, tpot_of

WIDTH = 50


@dataclass(slots=True)
class TargetRun:
    """One target's run: its label, the URL measured, its outputs, and their summary."""

    label: str
    url: str
    outputs: list[RequestOutput]
    start: float
    summary: dict[str, Any]
    streamed: bool = True


def _rows(summary: dict[str, Any], metrics: Sequence[str], percentiles: Sequence[float]) -> list[tuple[str, Any]]:
    """The table's rows as (label, value); a label ending in ':' opens a section."""
    rows: list[tuple[str, Any]] = [
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Benchmark duration (s)", summary["duration_s"]),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total generated tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", summary["request_throughput"]),
        ("Request send rate (req/s)", summary["request_send_rate"]),
    ]
    if summary.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s)", summary["request_goodput"]))
    rows += [
        ("Output token throughput (tok/s)", summary["output_throughput"]),
        ("Total token throughput (tok/s)", summary["total_token_throughput"]),
        ("Peak concurrent requests", summary["peak_concurrency"]),
    ]
    for name in metrics:
        short, title = METRICS[name]
        rows.append((f"{title}:", None))
        rows.append((f"Mean {short} (ms)", summary[f"mean_{name}_ms"]))
        rows.append((f"Median {short} (ms)", summary[f"median_{name}_ms"]))
        rows.append((f"Std {short} (ms)", summary[f"std_{name}_ms"]))
        for p in percentiles:
            key = percentile_key(p)
            rows.append((f"{key.upper()} {short} (ms)", summary[f"{key}_{name}_ms"]))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def print_summary(
    summary: dict[str, Any],
    metrics: Sequence[str],
    percentiles: Sequence[float],
    out: IO[str],
    title: str = "Serving Benchmark Result",
) -> None:
    """vLLM's result table, then the failures by error code when there are any."""
    print(f" {title} ".center(WIDTH, "="), file=out)
    for label, value in _rows(summary, metrics, percentiles):
        if label.endswith(":"):
            print(f"{label[:-1]}".center(WIDTH, "-"), file=out)
        else:
            print(f"{label + ':':<40} {_fmt(value):<10}", file=out)
    if summary["errors"]:
        print("Failures by error code".center(WIDTH, "-"), file=out)
        for code, count in summary["errors"].items():
            print(f"{code + ':':<40} {count:<10}", file=out)
    print("=" * WIDTH, file=out)


def ratios(baseline: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    """other/baseline for every numeric figure; None where the baseline is zero or missing."""
    result: dict[str, float | None] = {}
    for key, base in baseline.items():
        value = other.get(key)
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not isinstance(value, (int, float)):
            continue
        result[key] = value / base if base else None
    return result


def print_comparison(
    runs: Sequence[TargetRun],
    metrics: Sequence[str],
    percentiles: Sequence[float],
    out: IO[str],
) -> None:
    """Each figure side by side for every target, and each target's ratio to the first."""
    base = runs[0]
    label_width = 34
    col = max(12, *(len(r.label) + 2 for r in runs))
    ratio_heads = [f"{r.label}/{base.label}" for r in runs[1:]]
    rcol = max(12, *(len(h) + 2 for h in ratio_heads))
    width = label_width + col * len(runs) + rcol * len(ratio_heads)
    print(" Comparison ".center(width, "="), file=out)
    for run in runs:
        print(f"{run.label}: {run.url}", file=out)
    header = f"{'':<{label_width}}" + "".join(f"{r.label:>{col}}" for r in runs)
    print(header + "".join(f"{h:>{rcol}}" for h in ratio_heads), file=out)
    rows_per_run = [_rows(r.summary, metrics, percentiles) for r in runs]
    for i, (label, _) in enumerate(rows_per_run[0]):
        if label.endswith(":"):
            print(f"{label[:-1]}".center(width, "-"), file=out)
            continue
        values = [rows[i][1] for rows in rows_per_run]
        line = f"{label:<{label_width}}" + "".join(f"{_fmt(v):>{col}}" for v in values)
        base_value = values[0]
        for v in values[1:]:
            numeric = isinstance(v, (int, float)) and isinstance(base_value, (int, float)) and base_value
            line += f"{(f'{v / base_value:.3f}x' if numeric else 'n/a'):>{rcol}}"
        print(line, file=out)
    print("=" * width, file=out)


def request_record(run: TargetRun, output: RequestOutput) -> dict[str, Any]:
    tpot = tpot_of(output) if output.success and run.streamed else None
    return {
        "type": "request",
        "target": run.label,
        "index": output.index,
        "success": output.success,
        "status": output.status or None,
        "error": output.error or None,
        "error_detail": output.error_detail or None,
        "start_s": round(output.start - run.start, 6) if output.start else None,
        "ttft_ms": round(output.ttft * 1000, 3) if output.success else None,
        "tpot_ms": round(tpot * 1000, 3) if tpot is not None else None,
        "itl_ms": [round(v * 1000, 3) for v in output.itl],
        "e2el_ms": round(output.latency * 1000, 3),
        "prompt_tokens": output.prompt_tokens,
        "output_tokens": output.output_tokens if output.success else 0,
    }


def write_jsonl(path: str, runs: Sequence[TargetRun], settings: dict[str, Any]) -> None:
    """One line per request, one `summary` line per target, and a `comparison` line when there are several."""
    with open(path, "wb") as f:
        for run in runs:
            for output in run.outputs:
                f.write(orjson.dumps(request_record(run, output)) + b"\n")
            record = {"type": "summary", "target": run.label, "url": run.url, **settings, **run.summary}
            f.write(orjson.dumps(record) + b"\n")
        if len(runs) > 1:
            comparison = {
                "type": "comparison",
                "baseline": runs[0].label,
                "ratios": {r.label: ratios(runs[0].summary, r.summary) for r in runs[1:]},
            }
            f.write(orjson.dumps(comparison) + b"\n")
