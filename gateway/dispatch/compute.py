"""The compute functions as the gateway sees them: what they are asked, and what their answers mean.

The ``parsl`` and ``globus`` transports run the same compute functions on the
workers (``compute_functions.inference.inference`` and
``compute_functions.status.status``), so both build the request the same way and
turn a result into the same answer or the same typed ``Backend*`` error. The
gateway names the functions rather than importing them: under ``globus`` they
run on a remote endpoint, and only registration needs the code itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import orjson

from gateway.dispatch.base import (
    BackendError,
    BackendFailure,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
)
from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint

ComputeFunction = Callable[[dict[str, Any]], dict[str, Any]]

# Name -> "module:function". The names are the keys of an endpoint's ``function_ids``.
FUNCTIONS = {
    "inference": "compute_functions.inference:inference",
    "status": "compute_functions.status:status",
    "batch": "compute_functions.batch:run_batch",
}


def load_function(name: str) -> ComputeFunction:
    """The compute function called ``name`` in ``FUNCTIONS``, imported now."""
    module_name, _, attribute = FUNCTIONS[name].partition(":")
    function: ComputeFunction = getattr(importlib.import_module(module_name), attribute)
    return function


def compute_request(
    op: str,
    payload: dict[str, Any],
    *,
    model_server: dict[str, Any],
    timeout: float,
    stream: dict[str, str] | None = None,
    node_requests: int | None = None,
) -> dict[str, Any]:
    """The argument of ``inference``: the operation, the body, how to start the model server, and where to stream.

    With ``node_requests``, the worker hands the request to its node's request server, which serves up to that many
    at once, and the outcome comes through the relay at ``stream`` (see ``relayed_outcome``).
    """
    request = {"op": op, "payload": payload, "model_server": model_server, "timeout": timeout, "stream": stream}
    if node_requests is not None:
        request["node_requests"] = node_requests
    return request


def _failure(endpoint: Endpoint, error: Any) -> BackendFailure:
    if not isinstance(error, dict):
        return BackendProtocolError(endpoint, "compute function failed without saying why")
    kind = error.get("kind")
    message = str(error.get("message") or kind or "no message")
    status = error.get("status")
    if kind == "upstream" and isinstance(status, int):
        body = error.get("body")
        if isinstance(body, str):
            raw = body.encode()
        elif body is None:
            raw = orjson.dumps({"error": {"message": message}})
        else:
            raw = orjson.dumps(body)
        return BackendError(endpoint, status, raw)
    if kind in ("model_start_failed", "upstream"):
        # Nothing answered on that node, so another endpoint may still serve the request.
        return BackendUnavailable(endpoint, f"{kind}: {message}")
    if kind == "timeout":
        return BackendTimeout(endpoint, f"worker gave up: {message}")
    return BackendProtocolError(endpoint, f"compute function reported {kind or 'an unknown error'}: {message}")


def _checked(endpoint: Endpoint, result: Any) -> dict[str, Any]:
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        raise BackendProtocolError(endpoint, "compute function returned something other than its result shape")
    if not result["ok"]:
        raise _failure(endpoint, result.get("error"))
    return result


def answer_of(endpoint: Endpoint, result: Any) -> dict[str, Any]:
    """The model server's whole answer carried by an ``inference`` result, or the typed error it reports."""
    response = _checked(endpoint, result).get("response")
    if not isinstance(response, dict):
        raise BackendProtocolError(endpoint, "compute function result has no response object")
    return response


def taken(endpoint: Endpoint, result: Any) -> None:
    """That the node's request server took the request, or the typed error the ``inference`` result reports."""
    if _checked(endpoint, result).get("relayed") is not True:
        raise BackendProtocolError(endpoint, "compute function result does not say that a worker took the request")


def streamed_count(endpoint: Endpoint, result: Any) -> int:
    """How many events a streaming ``inference`` pushed to the relay, or the typed error it reports."""
    streamed = _checked(endpoint, result).get("streamed")
    if not isinstance(streamed, int) or isinstance(streamed, bool):
        raise BackendProtocolError(endpoint, "compute function result does not say how many events it streamed")
    return streamed


def served_availability(endpoint: Endpoint, report: Any, detail: str) -> Availability:
    """What a node's ``status`` report says of ``endpoint``'s models.

    ``hot``, with their load, when a model server of the node answers for any of
    them (the others are ``cold_models``); ``cold`` when none is loaded, since a
    request would start its server first.
    """
    if not isinstance(report, dict) or not isinstance(report.get("models"), list):
        raise BackendProtocolError(endpoint, "the status function returned something other than its report")
    public = {endpoint.backend_model(model): model for model in endpoint.models}
    served = [
        entry
        for entry in report["models"]
        if isinstance(entry, dict) and entry.get("model") in public and entry.get("healthy")
    ]
    if not served:
        return Availability("cold", detail=f"{detail}; the model server starts with a request")
    loaded = {public[entry["model"]] for entry in served}
    return Availability(
        "hot",
        detail=detail,
        running=sum(int(entry.get("running") or 0) for entry in served),
        waiting=sum(int(entry.get("waiting") or 0) for entry in served),
        cold_models=frozenset(endpoint.models) - loaded,
    )
