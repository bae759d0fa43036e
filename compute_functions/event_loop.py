"""The event loop the worker's asyncio code runs on: uvloop's where the node has it, asyncio's own otherwise.

uvloop is optional on worker nodes (uvicorn's standard extras bring it where the gateway is installed); where it is,
its loop costs half as much per request, which is the request server's CPU per request and a batch's throughput.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on a new event loop, as ``asyncio.run`` does."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)
