"""The simulator's ``/metrics``: its engines' gauges and counters in Prometheus' text format, named as vLLM does."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.simulator.engine import FINISH_REASONS, Engine

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


# The families of one value per engine: (name, kind, help, the ``Engine`` attribute that holds the value).
_PER_ENGINE = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", "running"),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", "waiting"),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", "prompt_tokens"),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", "generation_tokens"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(engines: Iterable[Engine]) -> str:
    """The Prometheus text exposition (format 0.0.4) of the engines' gauges and counters, named as vLLM names them."""
    engines = list(engines)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{labels}}} {float(value)!r}" for labels, value in samples)

    def labels(engine: Engine, **extra: str) -> str:
        pairs = {"engine": "0", **extra, "model_name": engine.model}
        return ",".join(f'{key}="{_label(value)}"' for key, value in pairs.items())

    for name, kind, help_text, attribute in _PER_ENGINE:
        family(name, kind, help_text, [(labels(engine), getattr(engine, attribute)) for engine in engines])
    family(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        [
            (labels(engine, finished_reason=reason), engine.finished[reason])
            for engine in engines
            for reason in FINISH_REASONS
        ],
    )
    return "\n".join(lines) + "\n"
