"""The simulator's HTTP face: vLLM's OpenAI-compatible routes as a plain ASGI application.

A raw ASGI callable rather than a framework keeps the request path short (one JSON parse, one JSON dump, two
``send`` calls for a whole answer), which is what lets one core answer thousands of requests a second. It
imports only the standard library and orjson so that it runs wherever uvicorn does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.simulator.engine import FINISH_REASONS, Engine, Output, embed, float32_base64, generate, prompt_seed

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

# A stream with no token delay would otherwise never give the event loop back until it ends.
_YIELD_EVERY_TOKENS = 16
# Choice j of n starts this far along the word sequence from choice 0, so the choices differ.
_CHOICE_STRIDE = 1009
# vLLM's defaults: VLLM_MAX_N_SEQUENCES and --max-logprobs.
_MAX_N = 16384
_MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """How the simulator behaves; every field has a command-line option of the same name."""

    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8001
    ttft: float = 0.0
    tpot: float = 0.0
    tpot_batch_factor: float = 0.0
    max_num_seqs: int = 256
    default_max_tokens: int = 16
    embedding_dim: int = 16
    max_model_len: int = 32768
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one model name is needed")
        if self.ttft < 0 or self.tpot < 0 or self.tpot_batch_factor < 0:
            raise ValueError("ttft, tpot and tpot_batch_factor cannot be negative")
        for name in ("max_num_seqs", "default_max_tokens", "embedding_dim", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


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


@dataclass(frozen=True, slots=True)
class _Protocol:
    """What differs between the chat and the legacy completions answers."""

    id_prefix: str
    whole_object: str
    chunk_object: str
    chat: bool
    # vLLM's own fields of a whole answer, beside OpenAI's.
    vllm_fields: dict[str, None]


_CHAT = _Protocol(
    "chatcmpl-",
    "chat.completion",
    "chat.completion.chunk",
    chat=True,
    vllm_fields=dict.fromkeys(
        ("prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params", "metrics")
    ),
)
_COMPLETION = _Protocol(
    "cmpl-",
    "text_completion",
    "text_completion",
    chat=False,
    vllm_fields=dict.fromkeys(("kv_transfer_params", "ec_transfer_params", "metrics")),
)
_USAGE_DETAILS = {"prompt_tokens_details": None, "completion_tokens_details": None}

_JSON = b"application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_DONE = b"data: [DONE]\n\n"


def create_app(settings: SimulatorSettings) -> SimulatorApp:
    """The ASGI application for ``settings``; serve it with uvicorn."""
    return SimulatorApp(settings)


class SimulatorApp:
    """vLLM's OpenAI-compatible server, answering with synthetic text on a configurable timing model.

    Each model has its own ``Engine`` (its own ``max_num_seqs`` slots), as if each were a separate vLLM.
    """

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.engines = {name: Engine(name, settings.max_num_seqs) for name in settings.models}
        self._default_model = settings.models[0]
        self._delayed = settings.ttft > 0 or settings.tpot > 0
        self._id_prefix = os.urandom(6).hex()
        self._ids = 0
        self._routes: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": ("POST", self._chat_completions),
            "/v1/completions": ("POST", self._completions),
            "/v1/embeddings": ("POST", self._embeddings),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
        }
        created = int(time.time())
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "simulator",
                        "root": name,
                        "parent": None,
                        "max_model_len": settings.max_model_len,
                        "permission": [],
                        "simulated": True,
                    }
                    for name in settings.models
                ],
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = self._routes.get(scope["path"])
        try:
            if route is None:
                raise RequestRejected(404, f"Not Found: {scope['path']}")
            method, handler = route
            if scope["method"] != method:
                raise RequestRejected(
                    405, f"Method Not Allowed: use {method} for {scope['path']}", headers=[(b"allow", method.encode())]
                )
            await handler(scope, receive, send)
        except RequestRejected as error:
            await _send_whole(send, error.status, error.body(), _JSON, error.headers)
        except _ClientGone:
            return

    # Routes -------------------------------------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_whole(send, 200, b"", None)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_whole(send, 200, self._models_body, _JSON)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_whole(send, 200, render_metrics(self.engines.values()).encode(), _METRICS_TYPE)

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _parse_json(await _read_body(receive))
        engine = self._engine(request)
        text, prompt_tokens = _chat_prompt(request.get("messages"))
        limit = request.get("max_completion_tokens")
        if limit is None:
            limit = request.get("max_tokens")
        max_tokens = self._max_tokens(limit, prompt_tokens)
        await self._generate(_CHAT, request, engine, [(text, prompt_tokens)], max_tokens, receive, send)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _parse_json(await _read_body(receive))
        engine = self._engine(request)
        prompts = _completion_prompts(request.get("prompt"))
        max_tokens = self._max_tokens(request.get("max_tokens"), max(tokens for _, tokens in prompts))
        await self._generate(_COMPLETION, request, engine, prompts, max_tokens, receive, send)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _parse_json(await _read_body(receive))
        engine = self._engine(request)
        inputs = _embedding_inputs(request.get("input"))
        dimensions = request.get("dimensions")
        if dimensions is None:
            dimensions = self.settings.embedding_dim
        elif not _is_int(dimensions) or not 1 <= dimensions <= self.settings.embedding_dim:
            raise RequestRejected(
                400,
                f"Model {engine.model!r} only supports dimensions in range [1, {self.settings.embedding_dim}], "
                f"got {dimensions}.",
                param="dimensions",
            )
        encoding = request.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise RequestRejected(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
        prompt_tokens = sum(tokens for _, tokens in inputs)
        for _, tokens in inputs:
            if tokens > self.settings.max_model_len:
                raise RequestRejected(
                    400,
                    f"This model's maximum context length is {self.settings.max_model_len}"
                    f" tokens. However, you requested {tokens} tokens in the input for "
                    "embedding generation. Please reduce the length of the input.",
                    param="input",
                )

        async def answer() -> None:
            if self.settings.ttft > 0:
                await asyncio.sleep(self.settings.ttft)
            data = []
            for index, (text, _) in enumerate(inputs):
                vector = embed(text, dimensions)
                value: str | list[float] = float32_base64(vector) if encoding == "base64" else vector.tolist()
                data.append({"object": "embedding", "index": index, "embedding": value})
            body = {
                "id": f"embd-{self._next_id()}",
                "object": "list",
                "created": int(time.time()),
                "model": engine.model,
                "data": data,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens,
                    "completion_tokens": 0,
                    **_USAGE_DETAILS,
                },
                "simulated": True,
            }
            await _send_whole(send, 200, orjson.dumps(body), _JSON)
            engine.record(0, ["stop"])

        await self._run(engine, prompt_tokens, answer, receive)

    # Generation ---------------------------------------------------------------------------------------------

    async def _generate(
        self,
        protocol: _Protocol,
        request: dict[str, Any],
        engine: Engine,
        prompts: list[tuple[str, int]],
        max_tokens: int,
        receive: Receive,
        send: Send,
    ) -> None:
        n = request.get("n")
        if n is None:
            n = 1
        elif not _is_int(n) or n < 1:
            raise RequestRejected(400, "n must be at least 1", param="n")
        elif n > _MAX_N:
            raise RequestRejected(
                400,
                f"n must be at most {_MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES "
                "environment variable.",
                param="n",
            )
        _check_logprobs(request, "top_logprobs" if protocol is _CHAT else "logprobs")
        stop = _stop_strings(request.get("stop"))
        stream = request.get("stream") is True
        options = request.get("stream_options")
        if options is not None and not stream:
            raise RequestRejected(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestRejected(400, "stream_options must be an object", param="stream_options")
        include_usage = bool(options and options.get("include_usage"))
        continuous_usage = include_usage and bool(options and options.get("continuous_usage_stats"))

        outputs = [
            generate(p * n + j, prompt_seed(text) + j * _CHOICE_STRIDE, max_tokens, stop)
            for p, (text, _) in enumerate(prompts)
            for j in range(n)
        ]
        answer = _Answer(
            protocol=protocol,
            engine=engine,
            outputs=outputs,
            prompt_tokens=sum(tokens for _, tokens in prompts),
            request_id=f"{protocol.id_prefix}{self._next_id()}",
            created=int(time.time()),
        )
        if not stream:
            await self._run(engine, answer.prompt_tokens, lambda: self._answer_whole(answer, send), receive)
            return
        chunks = _Chunks(answer, include_usage, continuous_usage)
        progress = _Progress()
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await self._run(
            engine, answer.prompt_tokens, lambda: self._answer_stream(answer, chunks, progress, send), receive, progress
        )

    def _tpot(self, engine: Engine) -> float:
        """Time per token now: a batched engine slows down as more sequences run beside this one."""
        return self.settings.tpot * (1 + self.settings.tpot_batch_factor * max(engine.running - 1, 0))

    async def _answer_whole(self, answer: _Answer, send: Send) -> None:
        delay = self.settings.ttft + (answer.steps - 1) * self._tpot(answer.engine)
        if delay > 0:
            await asyncio.sleep(delay)
        completion_tokens = sum(len(output.pieces) for output in answer.outputs)
        body = {
            "id": answer.request_id,
            "object": answer.protocol.whole_object,
            "created": answer.created,
            "model": answer.engine.model,
            "choices": [_whole_choice(answer.protocol, output) for output in answer.outputs],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {**_usage(answer.prompt_tokens, completion_tokens), **_USAGE_DETAILS},
            **answer.protocol.vllm_fields,
            "simulated": True,
        }
        await _send_whole(send, 200, orjson.dumps(body), _JSON)
        answer.engine.record(completion_tokens, [output.finish_reason for output in answer.outputs])

    async def _answer_stream(self, answer: _Answer, chunks: _Chunks, progress: _Progress, send: Send) -> None:
        tpot = self.settings.tpot
        batched = self.settings.tpot_batch_factor > 0
        if self.settings.ttft > 0:
            await asyncio.sleep(self.settings.ttft)
        if answer.protocol.chat:
            for output in answer.outputs:
                await _send_chunk(send, chunks.role(output.index))
        for step in range(answer.steps):
            if step:
                if tpot > 0:
                    await asyncio.sleep(self._tpot(answer.engine) if batched else tpot)
                elif step % _YIELD_EVERY_TOKENS == 0:
                    await asyncio.sleep(0)
            for output in answer.outputs:
                if step < len(output.pieces):
                    await _send_chunk(send, chunks.token(output, step))
                    progress.tokens += 1
        if chunks.include_usage:
            await _send_chunk(send, chunks.usage(progress.tokens))
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        answer.engine.record(progress.tokens, [output.finish_reason for output in answer.outputs])

    async def _run(
        self,
        engine: Engine,
        prompt_tokens: int,
        answer: Callable[[], Awaitable[None]],
        receive: Receive,
        progress: _Progress | None = None,
    ) -> None:
        """Run ``answer`` in one of ``engine``'s slots, and give the slot back if the client goes away."""
        acquired = engine.try_acquire()
        watch = _DisconnectWatch(receive) if self._delayed or not acquired else None
        try:
            if not acquired:
                await engine.acquire()
                acquired = True
            engine.prompt_tokens += prompt_tokens
            await answer()
        except asyncio.CancelledError:
            if watch is None or not watch.client_gone:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            engine.record(progress.tokens if progress else 0, ["abort"])
        finally:
            if watch is not None:
                watch.stop()
            if acquired:
                engine.release()

    # Request fields -----------------------------------------------------------------------------------------

    def _engine(self, request: dict[str, Any]) -> Engine:
        model = request.get("model")
        if model is None:
            return self.engines[self._default_model]
        engine = self.engines.get(model) if isinstance(model, str) else None
        if engine is None:
            raise RequestRejected(404, f"The model `{model}` does not exist.", param="model")
        return engine

    def _max_tokens(self, requested: Any, prompt_tokens: int) -> int:
        limit = self.settings.max_model_len
        if requested is None:
            if prompt_tokens >= limit:
                raise RequestRejected(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, "
                    f"your request has {prompt_tokens} input tokens. Please reduce the length "
                    "of the input messages.",
                    param="messages",
                )
            return min(self.settings.default_max_tokens, limit - prompt_tokens)
        if not _is_int(requested) or requested < 1:
            raise RequestRejected(400, f"max_tokens must be at least 1, got {requested!r}.", param="max_tokens")
        if prompt_tokens + requested > limit:
            raise RequestRejected(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the messages, "
                f"{requested} in the completion). Please reduce the length of the messages or "
                "completion.",
                param="max_tokens",
            )
        return int(requested)

    def _next_id(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}{self._ids:010x}"


@dataclass(slots=True)
class _Progress:
    tokens: int = 0


class _DisconnectWatch:
    """Cancels the request's task when the client hangs up, so a queued or sleeping request frees its slot.

    uvicorn drops writes to a closed connection silently; the only sign is ``http.disconnect`` on ``receive``.
    """

    def __init__(self, receive: Receive) -> None:
        self.client_gone = False
        self._active = True
        self._request = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if self._active and self._request is not None:
                    self.client_gone = True
                    self._request.cancel()
                return

    def stop(self) -> None:
        self._active = False
        self._watcher.cancel()


@dataclass(frozen=True, slots=True)
class _Answer:
    """One generation request, decided before it runs: its outputs are fixed, only their timing is left."""

    protocol: _Protocol
    engine: Engine
    outputs: list[Output]
    prompt_tokens: int
    request_id: str
    created: int

    @property
    def steps(self) -> int:
        return max(len(output.pieces) for output in self.outputs)


class _Chunks:
    """The server-sent events of one stream, as bytes built from parts serialized once per stream."""

    def __init__(self, answer: _Answer, include_usage: bool, continuous_usage: bool) -> None:
        self.include_usage = include_usage
        self._chat = answer.protocol.chat
        self._prompt_tokens = answer.prompt_tokens
        self._continuous = continuous_usage
        self._envelope = {
            "id": answer.request_id,
            "object": answer.protocol.chunk_object,
            "created": answer.created,
            "model": answer.engine.model,
            "simulated": True,
        }
        self._head = b"data: " + orjson.dumps(self._envelope)[:-1] + b',"choices":[{"index":'
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def role(self, index: int) -> bytes:
        delta = b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
        return b"".join((self._head, str(index).encode(), delta, self._usage_tail(0)))

    def token(self, output: Output, step: int) -> bytes:
        text = orjson.dumps(output.pieces[step])
        content = b',"delta":{"content":' + text + b"}" if self._chat else b',"text":' + text
        if step == len(output.pieces) - 1:
            reason, stop_reason = orjson.dumps(output.finish_reason), orjson.dumps(output.stop_reason)
            finish = b',"logprobs":null,"finish_reason":' + reason + b',"stop_reason":' + stop_reason + b"}]"
        else:
            finish = b',"logprobs":null,"finish_reason":null}]'
        return b"".join((self._head, str(output.index).encode(), content, finish, self._usage_tail(step + 1)))

    def usage(self, completion_tokens: int) -> bytes:
        chunk = {**self._envelope, "choices": [], "usage": _usage(self._prompt_tokens, completion_tokens)}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _usage_tail(self, completion_tokens: int) -> bytes:
        if not self._continuous:
            return self._tail
        return b',"usage":' + orjson.dumps(_usage(self._prompt_tokens, completion_tokens)) + b"}\n\n"


def _whole_choice(protocol: _Protocol, output: Output) -> dict[str, Any]:
    # Every field vLLM's answers carry, null where the simulator has nothing to say (vLLM leaves out an empty
    # ``tool_calls``), so that a client written against vLLM finds each one.
    if protocol.chat:
        return {
            "index": output.index,
            "message": {
                "role": "assistant",
                "content": output.text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": output.finish_reason,
            "stop_reason": output.stop_reason,
            "token_ids": None,
            "routed_experts": None,
        }
    return {
        "index": output.index,
        "text": output.text,
        "logprobs": None,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
        "token_ids": None,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "routed_experts": None,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# Parsing ------------------------------------------------------------------------------------------------------


def _check_logprobs(request: dict[str, Any], name: str) -> None:
    """vLLM's checks on the number of log-probabilities asked for (-1 means the whole vocabulary)."""
    value = request.get(name)
    if value is None:
        return
    if not _is_int(value) or (value < 0 and value != -1):
        raise RequestRejected(400, f"{name} must be non-negative or -1, got {value}.", param=name)
    if value == -1 or value > _MAX_LOGPROBS:
        shown = "the whole vocabulary" if value == -1 else value
        raise RequestRejected(
            400, f"Requested sample logprobs of {shown}, which is greater than max allowed: {_MAX_LOGPROBS}", param=name
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestRejected(400, f"The request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestRejected(400, "The request body must be a JSON object.")
    return request


def _words(text: str) -> int:
    return len(text.split())


def _chat_prompt(messages: Any) -> tuple[str, int]:
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
    return text, _words(text)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(token) for token in value)


def _ids_text(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def _completion_prompts(prompt: Any) -> list[tuple[str, int]]:
    """Each prompt of the batch as (text to derive the answer from, token count), as vLLM reads ``prompt``."""
    if isinstance(prompt, str):
        return [(prompt, _words(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return [(item, _words(item)) for item in prompt]
        if _token_ids(prompt):
            return [(_ids_text(prompt), len(prompt))]
        if all(_token_ids(item) for item in prompt):
            return [(_ids_text(item), len(item)) for item in prompt]
    raise RequestRejected(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of token id lists.",
        param="prompt",
    )


def _embedding_inputs(value: Any) -> list[tuple[str, int]]:
    try:
        return _completion_prompts(value)
    except RequestRejected:
        raise RequestRejected(
            400,
            "input must be a string, a list of strings, a list of token ids or a list of token id lists.",
            param="input",
        ) from None


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(item for item in value if item)
    raise RequestRejected(400, "stop must be a string or a list of strings.", param="stop")


# ASGI plumbing ------------------------------------------------------------------------------------------------


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _send_whole(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_chunk(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# Metrics ------------------------------------------------------------------------------------------------------


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

    family(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        [(labels(engine), engine.running) for engine in engines],
    )
    family(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        [(labels(engine), engine.waiting) for engine in engines],
    )
    family(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        [(labels(engine), engine.prompt_tokens) for engine in engines],
    )
    family(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        [(labels(engine), engine.generation_tokens) for engine in engines],
    )
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
