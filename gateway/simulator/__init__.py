"""A vLLM-compatible model-server simulator for demos, tests and benchmarks: no model, synthetic answers.

Run it with ``python -m gateway.simulator --model NAME`` (or the ``inference-simulator`` script). It imports
nothing else from ``gateway``, so it can be launched on a worker node that has only uvicorn and orjson.
"""

from gateway.simulator.server import SimulatorApp, SimulatorSettings, create_app

__all__ = ["SimulatorApp", "SimulatorSettings", "create_app"]
