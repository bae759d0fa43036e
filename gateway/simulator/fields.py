"""The fields of a request read as vLLM reads them, and refused, with vLLM's error body, where vLLM refuses them."""

from __future__ import annotations

from typing import Any

import orjson

# vLLM's default --max-logprobs.
_MAX_LOGPROBS = 20


class RequestRejected(Exception):
    """A request the simulator refuses, answered with the OpenAI error body vLLM sends."""

    _TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError"}

    def __init__(
        self, status: int, message: str, *, param: str | None = None, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        error = {
            "message": self.message,
            "type": self._TYPES.get(self.status, "InternalServerError"),
            "param": self.param,
            "code": self.status,
        }
        return orjson.dumps({"error": error})


def check_logprobs(request: dict[str, Any], name: str) -> None:
    """vLLM's checks on the number of log-probabilities asked for (-1 means the whole vocabulary)."""
    value = request.get(name)
    if value is None:
        return
    if not is_int(value) or (value < 0 and value != -1):
        raise RequestRejected(400, f"{name} must be non-negative or -1, got {value}.", param=name)
    if value == -1 or value > _MAX_LOGPROBS:
        shown = "the whole vocabulary" if value == -1 else value
        raise RequestRejected(
            400, f"Requested sample logprobs of {shown}, which is greater than max allowed: {_MAX_LOGPROBS}", param=name
        )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestRejected(400, f"The request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestRejected(400, "The request body must be a JSON object.")
    return request


def words(text: str) -> int:
    return len(text.split())


def chat_prompt(messages: Any) -> tuple[str, int]:
    """The text the answer is derived from, and its token count: the words of every message's text."""
    if not isinstance(messages, list) or not messages:
        raise RequestRejected(400, "messages must be a non-empty list of messages.", param="messages")
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise RequestRejected(400, "each message must be an object with a role and content.", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        elif content is not None:
            raise RequestRejected(400, "message content must be a string or a list of content parts.", param="messages")
    text = "\n".join(texts)
    return text, words(text)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_int(token) for token in value)


def _ids_text(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def completion_prompts(prompt: Any) -> list[tuple[str, int]]:
    """Each prompt of the batch as (text to derive the answer from, token count), as vLLM reads ``prompt``."""
    if isinstance(prompt, str):
        return [(prompt, words(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return [(item, words(item)) for item in prompt]
        if _token_ids(prompt):
            return [(_ids_text(prompt), len(prompt))]
        if all(_token_ids(item) for item in prompt):
            return [(_ids_text(item), len(item)) for item in prompt]
    raise RequestRejected(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of token id lists.",
        param="prompt",
    )


def embedding_inputs(value: Any) -> list[tuple[str, int]]:
    try:
        return completion_prompts(value)
    except RequestRejected:
        raise RequestRejected(
            400,
            "input must be a string, a list of strings, a list of token ids or a list of token id lists.",
            param="input",
        ) from None


def stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(item for item in value if item)
    raise RequestRejected(400, "stop must be a string or a list of strings.", param="stop")
