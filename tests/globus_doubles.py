"""Stand-ins for the Globus Compute service at the SDK boundary: a client and an executor.

The executor runs the registered compute function itself, in this process, on
its own worker threads, the way an endpoint's workers would: arguments and
results go through the SDK's serializer, and an exception raised by the
function comes back as the SDK's ``TaskExecutionFailed`` with the traceback text.
"""

from __future__ import annotations

import threading
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.serialize import ComputeSerializer

from gateway.config import GlobusComputeSettings
from gateway.dispatch.compute import FUNCTIONS, load_function
from gateway.simulator import command as simulator_command
from tests.support import MODEL

GLOBUS_ENDPOINT = "11111111-2222-4444-8888-000000000001"
FUNCTION_IDS = {"inference": "aaaaaaaa-0000-4000-8000-000000000001", "status": "aaaaaaaa-0000-4000-8000-000000000002"}

ONLINE = {
    "status": "online",
    "details": {"total_workers": 4, "idle_workers": 3, "pending_tasks": 0, "outstanding_tasks": 1, "managers": 1},
}


class ComputeService:
    """A client double: endpoint status reports and function registration."""

    def __init__(self, status: dict[str, Any] | None = None) -> None:
        self.status: dict[str, Any] | Exception = status or ONLINE
        self.registered: dict[str, Callable[..., Any]] = {}
        self.refuse_registration: Exception | None = None
        self.status_calls: list[str] = []

    def get_endpoint_status(self, endpoint_uuid: str) -> dict[str, Any]:
        self.status_calls.append(endpoint_uuid)
        if isinstance(self.status, Exception):
            raise self.status
        return self.status

    def register_function(self, function: Callable[..., Any], description: str | None = None) -> str:
        if self.refuse_registration is not None:
            raise self.refuse_registration
        function_id = str(uuid.uuid4())
        self.registered[function_id] = function
        return function_id


def registered_functions(settings: GlobusComputeSettings) -> dict[str, Callable[..., Any]]:
    """Function id -> compute function, through the same name map ``register-functions`` registers from."""
    assert settings.function_ids is not None
    functions = {}
    for name in FUNCTIONS:
        function_id = getattr(settings.function_ids, name)
        if function_id is not None:
            functions[str(function_id)] = load_function(name)
    return functions


class InProcessExecutor:
    """An executor double for one endpoint; see the module docstring.

    ``fail_submissions`` makes every later task fail the way a refused submission does
    (the exception is set on the future, and the executor stops for good, as the SDK's does).
    """

    def __init__(self, settings: GlobusComputeSettings, workers: int = 4) -> None:
        self.endpoint_id = str(settings.endpoint_id)
        self.functions = registered_functions(settings)
        self.submitted: list[tuple[str, tuple[Any, ...]]] = []
        self.fail_submissions: Exception | None = None
        self.stopped = False
        self._serializer = ComputeSerializer()
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix=f"endpoint-{self.endpoint_id[:8]}")
        self._lock = threading.Lock()

    def submit_to_registered_function(
        self, function_id: str, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
    ) -> Future[Any]:
        with self._lock:
            if self.stopped:
                raise RuntimeError(f"{self!r} is shutdown; no new functions may be executed")
            self.submitted.append((function_id, args or ()))
            if self.fail_submissions is not None:
                refused: Future[Any] = Future()
                refused.set_exception(self.fail_submissions)
                self.stopped = True
                return refused
            sent = self._serializer.serialize((args or (), kwargs or {}))
            return self._workers.submit(self._execute, function_id, sent)

    def _execute(self, function_id: str, sent: str) -> Any:
        args, kwargs = self._serializer.deserialize(sent)
        function = self.functions.get(function_id)
        if function is None:
            raise TaskExecutionFailed(f"FunctionNotFound: no function {function_id}")
        try:
            result = function(*args, **kwargs)
        except Exception:
            raise TaskExecutionFailed(traceback.format_exc()) from None
        return self._serializer.deserialize(self._serializer.serialize(result))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self.stopped = True
        self._workers.shutdown(wait=wait, cancel_futures=cancel_futures)


class ExecutorFactory:
    """Makes one ``InProcessExecutor`` per call and keeps them all, to count and inspect them."""

    def __init__(self) -> None:
        self.made: list[InProcessExecutor] = []

    def __call__(self, client: Any, settings: GlobusComputeSettings) -> InProcessExecutor:
        executor = InProcessExecutor(settings)
        self.made.append(executor)
        return executor


def simulator_launch(state_dir: Path, *extra: str) -> dict[str, Any]:
    """``worker_model_server`` settings that start the simulator, keeping the node's files in ``state_dir``."""
    return {"command": simulator_command(MODEL, options=extra), "startup_timeout": 60, "state_dir": str(state_dir)}
