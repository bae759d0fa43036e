"""Checks on the control fields the gateway itself acts on; every other field passes through unchanged."""

from __future__ import annotations

from typing import Any

from gateway.api import passthrough
from gateway.config import RequestBounds
from gateway.errors import InvalidRequest

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _fail(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _fail("messages", "'messages' is required.", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages", "'messages' must be a non-empty list of message objects.")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _fail(param, f"'{param}' must be an object with 'role' and 'content'.")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _fail(f"{param}.role", f"'{param}.role' must be one of {', '.join(sorted(_ROLES))}.")
        content = message.get("content")
        if content is None:
            if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
                continue
            raise _fail(f"{param}.content", f"'{param}.content' is required.", "missing_required_parameter")
        if not isinstance(content, str | list):
            raise _fail(f"{param}.content", f"'{param}.content' must be a string or a list of content parts.")


def _check_prompt(prompt: Any) -> None:
    if prompt is None:
        raise _fail("prompt", "'prompt' is required.", "missing_required_parameter")
    valid = (
        isinstance(prompt, str)
        or (_is_string_list(prompt) and prompt)
        or (_is_token_list(prompt) and prompt)
        or (isinstance(prompt, list) and prompt and all(_is_token_list(item) and item for item in prompt))
    )
    if not valid:
        raise _fail("prompt", "'prompt' must be a string, a list of strings or a list of token ids.")


def _check_input(value: Any) -> None:
    if value is None:
        raise _fail("input", "'input' is required.", "missing_required_parameter")
    valid = (
        (isinstance(value, str) and value)
        or (_is_string_list(value) and value and all(value))
        or (_is_token_list(value) and value)
        or (isinstance(value, list) and value and all(_is_token_list(item) and item for item in value))
    )
    if not valid:
        raise _fail("input", "'input' must be a non-empty string, a list of strings or a list of token ids.")


def _check_count(body: dict[str, Any], name: str, low: int, high: int) -> None:
    """``body[name]``, when given, is an integer from ``low`` to ``high``: a backend asked for 2**62 choices or
    tokens would spend its memory on one request and stall everyone else's."""
    value = body.get(name)
    if value is not None and (not _is_int(value) or not low <= value <= high):
        raise _fail(name, f"'{name}' must be an integer from {low} to {high}.")


def _check_bounds(op: str, body: dict[str, Any], bounds: RequestBounds) -> None:
    if op == "embeddings":
        _check_count(body, "dimensions", 1, bounds.dimensions)
        return
    for name in ("max_tokens", "max_completion_tokens"):
        _check_count(body, name, 1, bounds.max_tokens)
    _check_count(body, "n", 1, bounds.n)
    if op == "completions":
        _check_count(body, "best_of", 1, bounds.best_of)
        best_of, n = body.get("best_of"), body.get("n")
        if best_of is not None and n is not None and best_of < n:
            raise _fail("best_of", "'best_of' must be at least 'n'.")
        _check_count(body, "logprobs", 0, bounds.logprobs)
        return
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _fail("logprobs", "'logprobs' must be true or false.", "invalid_type")
    _check_count(body, "top_logprobs", 0, bounds.top_logprobs)


def _check_sampling(body: dict[str, Any]) -> None:
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise _fail("stream", "'stream' must be true or false.", "invalid_type")
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise _fail("temperature", "'temperature' must be a number from 0 to 2.")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise _fail("top_p", "'top_p' must be a number greater than 0 and at most 1.")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and (not _is_string_list(stop) or len(stop) > 4):
        raise _fail("stop", "'stop' must be a string or a list of at most 4 strings.")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _fail("stream_options", "'stream_options' must be an object.", "invalid_type")


def validate(op: str, body: Any, bounds: RequestBounds) -> str:
    """Check ``body`` for operation ``op`` and return its model name; raise ``InvalidRequest`` otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if model is None:
        raise _fail("model", "'model' is required.", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _fail("model", "'model' must be a non-empty string.", "invalid_type")
    if op in passthrough.APIS:
        passthrough.check(op, body)
        # Their own token limits are bounded like chat's: an absurd one would hold a sequence slot for hours.
        for name in ("max_tokens", "max_output_tokens"):
            _check_count(body, name, 1, bounds.for_model(model).max_tokens)
        return model
    if op == "chat/completions":
        _check_messages(body.get("messages"))
    elif op == "completions":
        _check_prompt(body.get("prompt"))
    else:
        _check_input(body.get("input"))
        if body.get("stream"):
            raise _fail("stream", "Embeddings cannot be streamed.")
    _check_sampling(body)
    _check_bounds(op, body, bounds.for_model(model))
    return model
