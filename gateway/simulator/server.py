"""The simulator's HTTP face: vLLM's OpenAI-compatible routes as a plain ASGI application.

Its pieces: ``asgi`` (the plumbing), ``fields`` (reading requests as vLLM does), ``answers`` (the shapes of chat and
completions answers), ``metrics`` (``/metrics``) and ``apis`` (the routes beyond chat, completions and embeddings).
Like them it imports only the standard library and orjson, so that it runs wherever uvicorn does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.simulator.answers import (
    CHAT,
    COMPLETION,
    DONE,
    USAGE_DETAILS,
    YIELD_EVERY_TOKENS,
    Answer,
    Chunks,
    Protocol,
    StreamProgress,
    usage,
    whole_choice,
)
from gateway.simulator.asgi import (
    JSON,
    SSE_HEADERS,
    ClientGone,
    DisconnectWatch,
    Handler,
    Receive,
    Scope,
    Send,
    lifespan,
    read_body,
    send_chunk,
    send_whole,
)
from gateway.simulator.engine import Engine, embed, float32_base64, generate, prompt_seed
from gateway.simulator.fields import (
    RequestRejected,
    chat_prompt,
    check_logprobs,
    completion_prompts,
    embedding_inputs,
    is_int,
    parse_json,
    stop_strings,
)
from gateway.simulator.metrics import CONTENT_TYPE, render_metrics

# Choice j of n starts this far along the word sequence from choice 0, so the choices differ.
_CHOICE_STRIDE = 1009
# vLLM's default VLLM_MAX_N_SEQUENCES.
_MAX_N = 16384


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
        # The route table, path to (method, handler); ``apis.create_app`` adds the rest of vLLM's routes.
        self.routes: dict[str, tuple[str, Handler]] = {
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
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = self.routes.get(scope["path"])
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
            await send_whole(send, error.status, error.body(), JSON, error.headers)
        except ClientGone:
            return

    # Routes -------------------------------------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_whole(send, 200, b"", None)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_whole(send, 200, self._models_body, JSON)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_whole(send, 200, render_metrics(self.engines.values()).encode(), CONTENT_TYPE)

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parse_json(await read_body(receive))
        engine = self.engine_for(request)
        text, prompt_tokens = chat_prompt(request.get("messages"))
        limit = request.get("max_completion_tokens")
        if limit is None:
            limit = request.get("max_tokens")
        max_tokens = self.max_tokens(limit, prompt_tokens)
        await self._generate(CHAT, request, engine, [(text, prompt_tokens)], max_tokens, receive, send)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parse_json(await read_body(receive))
        engine = self.engine_for(request)
        prompts = completion_prompts(request.get("prompt"))
        max_tokens = self.max_tokens(request.get("max_tokens"), max(tokens for _, tokens in prompts))
        await self._generate(COMPLETION, request, engine, prompts, max_tokens, receive, send)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parse_json(await read_body(receive))
        engine = self.engine_for(request)
        inputs = embedding_inputs(request.get("input"))
        dimensions = request.get("dimensions")
        if dimensions is None:
            dimensions = self.settings.embedding_dim
        elif not is_int(dimensions) or not 1 <= dimensions <= self.settings.embedding_dim:
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
                "id": f"embd-{self.next_id()}",
                "object": "list",
                "created": int(time.time()),
                "model": engine.model,
                "data": data,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens,
                    "completion_tokens": 0,
                    **USAGE_DETAILS,
                },
                "simulated": True,
            }
            await send_whole(send, 200, orjson.dumps(body), JSON)
            engine.record(0, ["stop"])

        await self.run(engine, prompt_tokens, answer, receive)

    # Generation ---------------------------------------------------------------------------------------------

    async def _generate(
        self,
        protocol: Protocol,
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
        elif not is_int(n) or n < 1:
            raise RequestRejected(400, "n must be at least 1", param="n")
        elif n > _MAX_N:
            raise RequestRejected(
                400,
                f"n must be at most {_MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES "
                "environment variable.",
                param="n",
            )
        check_logprobs(request, "top_logprobs" if protocol is CHAT else "logprobs")
        stop = stop_strings(request.get("stop"))
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
        answer = Answer(
            protocol=protocol,
            engine=engine,
            outputs=outputs,
            prompt_tokens=sum(tokens for _, tokens in prompts),
            request_id=f"{protocol.id_prefix}{self.next_id()}",
            created=int(time.time()),
        )
        if not stream:
            await self.run(engine, answer.prompt_tokens, lambda: self._answer_whole(answer, send), receive)
            return
        chunks = Chunks(answer, include_usage, continuous_usage)
        progress = StreamProgress()
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await self.run(
            engine, answer.prompt_tokens, lambda: self._answer_stream(answer, chunks, progress, send), receive, progress
        )

    def tpot(self, engine: Engine) -> float:
        """Time per token now: a batched engine slows down as more sequences run beside this one."""
        return self.settings.tpot * (1 + self.settings.tpot_batch_factor * max(engine.running - 1, 0))

    async def _answer_whole(self, answer: Answer, send: Send) -> None:
        delay = self.settings.ttft + (answer.steps - 1) * self.tpot(answer.engine)
        if delay > 0:
            await asyncio.sleep(delay)
        completion_tokens = sum(len(output.pieces) for output in answer.outputs)
        body = {
            "id": answer.request_id,
            "object": answer.protocol.whole_object,
            "created": answer.created,
            "model": answer.engine.model,
            "choices": [whole_choice(answer.protocol, output) for output in answer.outputs],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {**usage(answer.prompt_tokens, completion_tokens), **USAGE_DETAILS},
            **answer.protocol.vllm_fields,
            "simulated": True,
        }
        await send_whole(send, 200, orjson.dumps(body), JSON)
        answer.engine.record(completion_tokens, [output.finish_reason for output in answer.outputs])

    async def _answer_stream(self, answer: Answer, chunks: Chunks, progress: StreamProgress, send: Send) -> None:
        """The tokens of a streamed answer on the engine's schedule: the first after ``ttft``, then one each
        ``tpot`` counted from when the last was due, not from when it was written. A model server's steps go at
        the accelerator's pace whatever its event loop is doing; a delay counted from each write would add every
        late wake-up of a busy machine to all the tokens after it."""
        tpot = self.settings.tpot
        batched = self.settings.tpot_batch_factor > 0
        loop = asyncio.get_running_loop()
        due = loop.time()
        if self.settings.ttft > 0:
            due += self.settings.ttft
            await asyncio.sleep(self.settings.ttft)
        if answer.protocol.chat:
            for output in answer.outputs:
                await send_chunk(send, chunks.role(output.index))
        for step in range(answer.steps):
            if step:
                if tpot > 0:
                    due += self.tpot(answer.engine) if batched else tpot
                    # Behind schedule, the token goes at once, as a model server's queued outputs do.
                    await asyncio.sleep(max(due - loop.time(), 0.0))
                elif step % YIELD_EVERY_TOKENS == 0:
                    await asyncio.sleep(0)
            for output in answer.outputs:
                if step < len(output.pieces):
                    await send_chunk(send, chunks.token(output, step))
                    progress.tokens += 1
        if chunks.include_usage:
            await send_chunk(send, chunks.usage(progress.tokens))
        await send({"type": "http.response.body", "body": DONE, "more_body": False})
        answer.engine.record(progress.tokens, [output.finish_reason for output in answer.outputs])

    async def run(
        self,
        engine: Engine,
        prompt_tokens: int,
        answer: Callable[[], Awaitable[None]],
        receive: Receive,
        progress: StreamProgress | None = None,
    ) -> None:
        """Run ``answer`` in one of ``engine``'s slots, and give the slot back if the client goes away."""
        acquired = engine.try_acquire()
        watch = DisconnectWatch(receive) if self._delayed or not acquired else None
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

    def engine_for(self, request: dict[str, Any]) -> Engine:
        """The engine of the model ``request`` names (the first model when it names none); 404 for another."""
        model = request.get("model")
        if model is None:
            return self.engines[self._default_model]
        engine = self.engines.get(model) if isinstance(model, str) else None
        if engine is None:
            raise RequestRejected(404, f"The model `{model}` does not exist.", param="model")
        return engine

    def max_tokens(self, requested: Any, prompt_tokens: int) -> int:
        """The tokens to generate: ``requested`` checked against the context length, or the default when None."""
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
        if not is_int(requested) or requested < 1:
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

    def next_id(self) -> str:
        """An id no other answer of this process has."""
        self._ids += 1
        return f"{self._id_prefix}{self._ids:010x}"
