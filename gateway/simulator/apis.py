"""The rest of vLLM's OpenAI-compatible server, in the simulator: Responses, Anthropic Messages, rerank and score,
and the tokenizer, with the shapes vLLM 0.32 gives them.

Generation reuses the simulator's engine (the same words, slots and timing as chat), so that a Responses or
Messages request costs what the same chat request costs. Scores are the cosine of the simulator's embeddings
mapped to [0, 1]. The tokenizer splits on whitespace, as the simulator counts tokens everywhere; a word's id is a
CRC of it, and the words it has handed out ids for are remembered so that ``/detokenize`` can give them back.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterator
from typing import Any

import orjson

from gateway.simulator.answers import YIELD_EVERY_TOKENS, StreamProgress
from gateway.simulator.asgi import JSON, SSE_HEADERS, Handler, Receive, Scope, Send, read_body, send_chunk, send_whole
from gateway.simulator.engine import Engine, Output, embed, generate, prompt_seed
from gateway.simulator.fields import RequestRejected, chat_prompt, is_int, parse_json, stop_strings, words
from gateway.simulator.server import SimulatorApp, SimulatorSettings

# How many distinct words the tokenizer remembers for ``/detokenize``; past it, new words still get ids.
_MAX_REMEMBERED_WORDS = 100_000
_SCORE_DIMENSIONS = 64


def create_app(settings: SimulatorSettings) -> SimulatorApp:
    """The simulator with every route of vLLM's OpenAI-compatible server; serve it with uvicorn."""
    app = SimulatorApp(settings)
    app.routes.update(MoreApis(app).routes())
    return app


class MoreApis:
    """The handlers of the routes beyond chat, completions and embeddings, for one ``SimulatorApp``."""

    def __init__(self, app: SimulatorApp) -> None:
        self.app = app
        self.settings = app.settings
        self._words: dict[int, str] = {}

    def routes(self) -> dict[str, tuple[str, Handler]]:
        return {
            "/v1/responses": ("POST", self._responses),
            "/v1/messages": ("POST", self._messages),
            "/v1/messages/count_tokens": ("POST", self._count_tokens),
            "/rerank": ("POST", self._rerank),
            "/v1/rerank": ("POST", self._rerank),
            "/v2/rerank": ("POST", self._rerank),
            "/score": ("POST", self._score),
            "/v1/score": ("POST", self._score),
            "/tokenize": ("POST", self._tokenize),
            "/detokenize": ("POST", self._detokenize),
        }

    # Generation -----------------------------------------------------------------------------------------------

    async def _responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parse_json(await read_body(receive))
        engine = self.app.engine_for(request)
        text, prompt_tokens = _responses_prompt(request.get("input"), request.get("instructions"))
        max_tokens = self.app.max_tokens(request.get("max_output_tokens"), prompt_tokens)
        output = generate(0, prompt_seed(text), max_tokens, ())
        answer = _ResponsesAnswer(request, engine.model, f"resp_{self.app.next_id()}", prompt_tokens, output)
        await self._generate(engine, answer, request.get("stream") is True, receive, send)

    async def _messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = parse_json(await read_body(receive))
            engine = self.app.engine_for(request)
            text, prompt_tokens = _messages_prompt(request.get("messages"), request.get("system"))
            limit = request.get("max_tokens")
            if limit is None:
                raise RequestRejected(400, "max_tokens: Field required", param="max_tokens")
            max_tokens = self.app.max_tokens(limit, prompt_tokens)
            stop = stop_strings(request.get("stop_sequences"))
        except RequestRejected as error:
            await _send_anthropic_error(send, error)
            return
        output = generate(0, prompt_seed(text), max_tokens, stop)
        answer = _MessagesAnswer(engine.model, f"msg_{self.app.next_id()}", prompt_tokens, output)
        await self._generate(engine, answer, request.get("stream") is True, receive, send)

    async def _count_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = parse_json(await read_body(receive))
            self.app.engine_for(request)
            _, prompt_tokens = _messages_prompt(request.get("messages"), request.get("system"))
        except RequestRejected as error:
            await _send_anthropic_error(send, error)
            return
        await send_whole(send, 200, orjson.dumps({"input_tokens": prompt_tokens}), JSON)

    async def _generate(
        self, engine: Engine, answer: _ResponsesAnswer | _MessagesAnswer, stream: bool, receive: Receive, send: Send
    ) -> None:
        output = answer.output
        if not stream:

            async def whole() -> None:
                delay = self.settings.ttft + (len(output.pieces) - 1) * self.app.tpot(engine)
                if delay > 0:
                    await asyncio.sleep(delay)
                await send_whole(send, 200, orjson.dumps(answer.whole()), JSON)
                engine.record(len(output.pieces), [output.finish_reason])

            await self.app.run(engine, answer.prompt_tokens, whole, receive)
            return
        progress = StreamProgress()

        async def streamed() -> None:
            if self.settings.ttft > 0:
                await asyncio.sleep(self.settings.ttft)
            for event in answer.opening():
                await send_chunk(send, event)
            for step, piece in enumerate(output.pieces):
                if step:
                    await self._pause(engine, step)
                await send_chunk(send, answer.delta(piece))
                progress.tokens += 1
            closing = b"".join(answer.closing())
            await send({"type": "http.response.body", "body": closing, "more_body": False})
            engine.record(progress.tokens, [output.finish_reason])

        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await self.app.run(engine, answer.prompt_tokens, streamed, receive, progress)

    async def _pause(self, engine: Engine, step: int) -> None:
        if self.settings.tpot > 0:
            await asyncio.sleep(self.app.tpot(engine))
        elif step % YIELD_EVERY_TOKENS == 0:
            await asyncio.sleep(0)

    # Scoring --------------------------------------------------------------------------------------------------

    async def _rerank(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parse_json(await read_body(receive))
        engine = self.app.engine_for(request)
        query = request.get("query")
        if not isinstance(query, str):
            raise RequestRejected(400, "query must be a string", param="query")
        documents = _texts(request.get("documents"), "documents")
        top_n = request.get("top_n", 0)
        if not is_int(top_n) or top_n < 0:
            raise RequestRejected(400, "top_n must be a non-negative integer", param="top_n")
        scores = [_score(query, document) for document in documents]
        order = sorted(range(len(documents)), key=lambda index: -scores[index])
        results = [
            {"index": index, "document": {"text": documents[index]}, "relevance_score": scores[index]}
            for index in order[: top_n or None]
        ]
        tokens = sum(words(query) + words(document) for document in documents)

        async def answer() -> None:
            body = {
                "id": f"rerank-{self.app.next_id()}",
                "model": engine.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": results,
                "simulated": True,
            }
            await self._answer(engine, body, send)

        await self.app.run(engine, tokens, answer, receive)

    async def _score(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parse_json(await read_body(receive))
        engine = self.app.engine_for(request)
        pairs = _score_pairs(request)
        tokens = sum(words(first) + words(second) for first, second in pairs)

        async def answer() -> None:
            body = {
                "id": f"score-{self.app.next_id()}",
                "object": "list",
                "created": int(time.time()),
                "model": engine.model,
                "data": [
                    {"index": index, "object": "score", "score": _score(first, second)}
                    for index, (first, second) in enumerate(pairs)
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
                "simulated": True,
            }
            await self._answer(engine, body, send)

        await self.app.run(engine, tokens, answer, receive)

    async def _answer(self, engine: Engine, body: dict[str, Any], send: Send) -> None:
        if self.settings.ttft > 0:
            await asyncio.sleep(self.settings.ttft)
        await send_whole(send, 200, orjson.dumps(body), JSON)
        engine.record(0, ["stop"])

    # Tokenizer ------------------------------------------------------------------------------------------------

    async def _tokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parse_json(await read_body(receive))
        self.app.engine_for(request)
        if "messages" in request:
            text, _ = chat_prompt(request.get("messages"))
        elif isinstance(request.get("prompt"), str):
            text = request["prompt"]
        else:
            raise RequestRejected(400, "prompt must be a string", param="prompt")
        words = text.split()
        tokens = [self._token(word) for word in words]
        body: dict[str, Any] = {
            "count": len(tokens),
            "max_model_len": self.settings.max_model_len,
            "tokens": tokens,
            "token_strs": words if request.get("return_token_strs") else None,
            "simulated": True,
        }
        await send_whole(send, 200, orjson.dumps(body), JSON)

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = parse_json(await read_body(receive))
        self.app.engine_for(request)
        tokens = request.get("tokens")
        if not isinstance(tokens, list) or not all(is_int(token) for token in tokens):
            raise RequestRejected(400, "tokens must be a list of token ids", param="tokens")
        unknown = [token for token in tokens if token not in self._words]
        if unknown:
            raise RequestRejected(400, f"Token id {unknown[0]} is out of vocabulary", param="tokens")
        body = {"prompt": " ".join(self._words[token] for token in tokens), "simulated": True}
        await send_whole(send, 200, orjson.dumps(body), JSON)

    def _token(self, word: str) -> int:
        token = zlib.crc32(word.encode("utf-8", "surrogatepass"))
        if len(self._words) < _MAX_REMEMBERED_WORDS:
            self._words.setdefault(token, word)
        return token


class _ResponsesAnswer:
    """One answer of ``/v1/responses``: the whole response object, or its stream of typed events."""

    def __init__(self, request: dict[str, Any], model: str, response_id: str, prompt_tokens: int, output: Output):
        self.output = output
        self.prompt_tokens = prompt_tokens
        self._request = request
        self._model = model
        self._id = response_id
        self._item_id = f"msg_{response_id.removeprefix('resp_')}"
        self._created = int(time.time())
        self._sequence = 0

    def whole(self) -> dict[str, Any]:
        return self._response("incomplete" if self.output.finish_reason == "length" else "completed", True)

    def _response(self, status: str, finished: bool) -> dict[str, Any]:
        request = self._request
        done = status != "in_progress"
        return {
            "id": self._id,
            "created_at": self._created,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.get("instructions"),
            "metadata": request.get("metadata"),
            "model": self._model,
            "object": "response",
            "output": [self._item("completed")] if finished else [],
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "temperature": request.get("temperature"),
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": request.get("tools", []),
            "top_p": request.get("top_p"),
            "background": request.get("background", False),
            "max_output_tokens": request.get("max_output_tokens"),
            "max_tool_calls": request.get("max_tool_calls"),
            "previous_response_id": request.get("previous_response_id"),
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": request.get("text"),
            "top_logprobs": None,
            "truncation": request.get("truncation", "disabled"),
            "user": request.get("user"),
            "usage": self._usage() if done else None,
            "simulated": True,
        }

    def _usage(self) -> dict[str, Any]:
        output_tokens = len(self.output.pieces)
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + output_tokens,
        }

    def _item(self, status: str) -> dict[str, Any]:
        content = [self._part()] if status == "completed" else []
        return {"id": self._item_id, "content": content, "role": "assistant", "status": status, "type": "message"}

    def _part(self, text: str | None = None) -> dict[str, Any]:
        return {
            "annotations": [],
            "text": self.output.text if text is None else text,
            "type": "output_text",
            "logprobs": None,
        }

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"

    def opening(self) -> Iterator[bytes]:
        yield self._event("response.created", response=self._response("in_progress", False))
        yield self._event("response.in_progress", response=self._response("in_progress", False))
        yield self._event("response.output_item.added", output_index=0, item=self._item("in_progress"))
        yield self._event(
            "response.content_part.added", item_id=self._item_id, output_index=0, content_index=0, part=self._part("")
        )

    def delta(self, piece: str) -> bytes:
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        return self._event("response.output_text.delta", **where, delta=piece, logprobs=[])

    def closing(self) -> Iterator[bytes]:
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        yield self._event("response.output_text.done", **where, text=self.output.text, logprobs=[])
        yield self._event("response.content_part.done", **where, part=self._part())
        yield self._event("response.output_item.done", output_index=0, item=self._item("completed"))
        # vLLM ends every stream with response.completed; its response's status says whether it was cut short.
        yield self._event("response.completed", response=self.whole())


class _MessagesAnswer:
    """One answer of Anthropic's ``/v1/messages``: the whole message, or its stream of typed events."""

    def __init__(self, model: str, message_id: str, prompt_tokens: int, output: Output) -> None:
        self.output = output
        self.prompt_tokens = prompt_tokens
        self._model = model
        self._id = message_id

    @property
    def _stop(self) -> tuple[str, str | None]:
        if self.output.finish_reason == "length":
            return "max_tokens", None
        if self.output.stop_reason is not None:
            return "stop_sequence", self.output.stop_reason
        return "end_turn", None

    def _usage(self, output_tokens: int) -> dict[str, int]:
        return {"input_tokens": self.prompt_tokens, "output_tokens": output_tokens}

    def whole(self) -> dict[str, Any]:
        stop_reason, stop_sequence = self._stop
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": self.output.text}],
            "model": self._model,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": self._usage(len(self.output.pieces)),
            "simulated": True,
        }

    @staticmethod
    def _event(kind: str, **fields: Any) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"

    def opening(self) -> Iterator[bytes]:
        message = {**self.whole(), "content": [], "stop_reason": None, "stop_sequence": None, "usage": self._usage(0)}
        yield self._event("message_start", message=message)
        yield self._event("content_block_start", index=0, content_block={"type": "text", "text": ""})

    def delta(self, piece: str) -> bytes:
        return self._event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})

    def closing(self) -> Iterator[bytes]:
        stop_reason, stop_sequence = self._stop
        yield self._event("content_block_stop", index=0)
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        yield self._event("message_delta", delta=delta, usage=self._usage(len(self.output.pieces)))
        yield self._event("message_stop")


async def _send_anthropic_error(send: Send, error: RequestRejected) -> None:
    """vLLM answers the errors of its Anthropic routes in Anthropic's shape, with its own error types."""
    kind = "NotFoundError" if error.status == 404 else "BadRequestError"
    body = {"type": "error", "error": {"type": kind, "message": error.message}}
    await send_whole(send, error.status, orjson.dumps(body), JSON)


# Request fields -------------------------------------------------------------------------------------------------


def _part_texts(content: Any, kinds: tuple[str, ...], param: str) -> Iterator[str]:
    """The texts of a string or a list of typed parts (``{"type": "input_text", "text": ...}``)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") in kinds and isinstance(part.get("text"), str):
                yield part["text"]
    elif content is not None:
        raise RequestRejected(400, f"{param} must be a string or a list of content parts", param=param)


def _responses_prompt(value: Any, instructions: Any) -> tuple[str, int]:
    if value is None:
        raise RequestRejected(400, "input: Field required", param="input")
    texts = list(_part_texts(instructions, ("input_text",), "instructions"))
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, dict):
                raise RequestRejected(400, "each input item must be an object", param="input")
            texts.extend(_part_texts(item.get("content"), ("input_text", "output_text", "text"), "input"))
    else:
        texts.extend(_part_texts(value, (), "input"))
    text = "\n".join(texts)
    return text, words(text)


def _messages_prompt(messages: Any, system: Any) -> tuple[str, int]:
    if not isinstance(messages, list) or not messages:
        raise RequestRejected(400, "messages must be a non-empty list of messages.", param="messages")
    texts = list(_part_texts(system, ("text",), "system"))
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise RequestRejected(400, "each message must have a role of user or assistant", param="messages")
        texts.extend(_part_texts(message.get("content"), ("text",), "messages"))
    text = "\n".join(texts)
    return text, words(text)


def _texts(value: Any, param: str) -> list[str]:
    """A string or a list of strings or ``{"text": ...}`` documents, as a list of texts."""
    items = value if isinstance(value, list) else [value]
    texts = [item.get("text") if isinstance(item, dict) else item for item in items]
    if not texts or not all(isinstance(text, str) for text in texts):
        raise RequestRejected(400, f"{param} must be a string or a list of strings", param=param)
    return texts  # type: ignore[return-value]


# vLLM's score request comes in four spellings of its two sides.
_SCORE_SIDES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


def _score_pairs(request: dict[str, Any]) -> list[tuple[str, str]]:
    for first_name, second_name in _SCORE_SIDES:
        if first_name in request and second_name in request:
            first, second = _texts(request[first_name], first_name), _texts(request[second_name], second_name)
            if len(first) == 1:
                first = first * len(second)
            if len(first) != len(second):
                raise RequestRejected(400, f"{first_name} must have one item or as many as {second_name}")
            return list(zip(first, second, strict=True))
    raise RequestRejected(400, "score needs queries and documents (or text_1 and text_2)", param="queries")


def _score(first: str, second: str) -> float:
    """A relevance in [0, 1]: the cosine of the two texts' simulated embeddings, moved up from [-1, 1]."""
    a, b = embed(first, _SCORE_DIMENSIONS), embed(second, _SCORE_DIMENSIONS)
    return (sum(x * y for x, y in zip(a, b, strict=True)) + 1) / 2
