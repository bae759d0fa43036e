"""The load of a vLLM server, read from its Prometheus ``/metrics`` text."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SAMPLE = re.compile(r"^(vllm:num_requests_(?:running|waiting))(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class ModelLoad:
    """Requests a model's engine is running and those waiting for a slot."""

    running: int = 0
    waiting: int = 0


def model_load(text: str, default_model: str = "") -> dict[str, ModelLoad]:
    """Running and waiting requests per model name (``default_model`` for samples without a ``model_name`` label).

    vLLM labels each sample with ``model_name`` (and ``engine`` when data-parallel); the engines of one model add up.
    """
    loads: dict[str, ModelLoad] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            count = int(float(value))
        except ValueError:
            continue
        model = dict(_LABEL.findall(labels or "")).get("model_name", default_model)
        load = loads.setdefault(model, ModelLoad())
        if name.endswith("running"):
            load.running += count
        else:
            load.waiting += count
    return loads
