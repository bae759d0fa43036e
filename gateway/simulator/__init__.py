"""A vLLM-compatible model-server simulator for demos, tests and benchmarks: no model, synthetic answers.

Run it with ``python -m gateway.simulator --model NAME`` (or the ``inference-simulator`` script). It imports
nothing else from ``gateway``, so it can be launched on a worker node that has only uvicorn and orjson.
"""

from gateway.simulator.apis import create_app
from gateway.simulator.server import SimulatorApp, SimulatorSettings

__all__ = ["SimulatorApp", "SimulatorSettings", "command", "create_app"]


def command(*models: str, options: tuple[str, ...] = ()) -> list[str]:
    """The simulator's command line serving ``models``, for ``ModelServer`` (which fills in python, host, port)."""
    launch = ["{python}", "-m", "gateway.simulator", "--host", "{host}", "--port", "{port}"]
    for model in models:
        launch += ["--model", model]
    return [*launch, *options]
