"""The request functions: one HTTP request to an OpenAI-compatible endpoint, timed.

They are the hot path of the tool: at a few thousand requests a second every microsecond per request is CPU
taken from the server under test on the same machine. So a streamed answer is not parsed chunk by chunk:
content chunks are counted by one regular expression over each network read, and JSON is decoded only for the
chunk that carries `usage` (or an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from enum import Enum
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

BACKENDS = ("vllm", "openai-chat", "openai")

# A content chunk has a non-empty `content` (chat) or `text` (completions); vLLM's first chat chunk carries
# only the role with `"content":""`, which must not count as the first token.
_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')
_USAGE = re.compile(rb'"usage"\s*:\s*\{')


def _usage_event(block: bytes) -> bytes | None:
    """The `data:` payload of the event in `block` that carries a usage object, if there is one."""
    # Compact JSON (vLLM's, the gateway's) is found by plain byte search; the expression serves spaced JSON.
    at = block.find(b'"usage":{')
    if at < 0:
        if b'": ' not in block or (match := _USAGE.search(block)) is None:
            return None
        at = match.start()
    line_start = block.rfind(b"\n", 0, at) + 1
    line_end = block.find(b"\n", at)
    line = block[line_start : line_end if line_end >= 0 else len(block)]
    return line[5:].strip() if line.startswith(b"data:") else None


class Api(Enum):
    CHAT = "/chat/completions"
    COMPLETIONS = "/completions"


def resolve_endpoint(backend: str, url: str, endpoint: str | None = None) -> tuple[str, Api]:
    """The URL to POST to and the API it speaks, from `--base-url` (and `--endpoint`) as given.

    `url` may be the full endpoint (`.../v1/chat/completions`, as in the usage guide), a base ending in `/v1`,
    or a bare server (`http://host:port`, vLLM's form, where `--endpoint` or the backend names the path).
    """
    path = urlsplit(url).path.rstrip("/")
    if endpoint and not path.endswith(("/chat/completions", "/completions")):
        url = url.rstrip("/") + "/" + endpoint.lstrip("/")
        path = urlsplit(url).path.rstrip("/")
    default = Api.COMPLETIONS if backend == "openai" else Api.CHAT
    if path.endswith(Api.CHAT.value):
        api = Api.CHAT
    elif path.endswith(Api.COMPLETIONS.value):
        api = Api.COMPLETIONS
    else:
        api = default
        url = url.rstrip("/") + ("" if path.endswith("/v1") else "/v1") + api.value
    if backend != "vllm" and api is not default:
        raise ValueError(
            f"--backend {backend} speaks {default.value} but the URL {url} is {api.value}; "
            f"use --backend {'openai-chat' if api is Api.CHAT else 'openai'} or --backend vllm"
        )
    return url, api


def build_body(
    api: Api,
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    stream: bool,
    ignore_eos: bool = False,
    temperature: float = 0.0,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The JSON body of one request; built before the run so that encoding costs nothing while it is timed."""
    body: dict[str, Any] = {"model": model}
    if api is Api.CHAT:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body["max_tokens"] = max_tokens
    body["temperature"] = temperature
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if extra:
        body.update(extra)
    return orjson.dumps(body)


@dataclass(slots=True)
class RequestOutput:
    """What one request measured. Times are `time.perf_counter()` seconds (one clock for every process)."""

    index: int
    prompt_tokens: int
    success: bool = False
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    content_chunks: int = 0
    usage_seen: bool = False
    status: int = 0
    error: str = ""
    error_detail: str = ""
    text: str | None = None


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "ssl_error"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection_refused" if isinstance(exc.os_error, ConnectionRefusedError) else "connection_error"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server_disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "incomplete_response"
    if isinstance(exc, aiohttp.ClientError):
        return "client_error"
    return type(exc).__name__


def _apply_usage(out: RequestOutput, usage: Any) -> None:
    if isinstance(usage, dict):
        out.usage_seen = True
        out.output_tokens = int(usage.get("completion_tokens") or 0)
        if usage.get("prompt_tokens"):
            out.prompt_tokens = int(usage["prompt_tokens"])


def _events(block: bytes) -> list[bytes]:
    return [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]


def _stream_error(block: bytes) -> str | None:
    for event in _events(block):
        if b'"error"' in event:
            try:
                message = orjson.loads(event)
            except orjson.JSONDecodeError:
                continue
            if isinstance(message, dict) and ("error" in message or message.get("object") == "error"):
                return event.decode(errors="replace")[:300]
    return None


def _text_of(events: list[bytes], api: Api) -> str:
    parts = []
    for event in events:
        try:
            message = orjson.loads(event)
            choice = message["choices"][0]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            continue
        piece = choice.get("delta", {}).get("content") if api is Api.CHAT else choice.get("text")
        if isinstance(piece, str):
            parts.append(piece)
    return "".join(parts)


class _StreamTimer:
    """Timestamps the content chunks of one stream as its network reads arrive."""

    __slots__ = ("first", "last", "out", "pending", "raw")

    def __init__(self, out: RequestOutput, keep_text: bool) -> None:
        self.out = out
        self.first = self.last = 0.0
        self.pending = b""
        self.raw: list[bytes] | None = [] if keep_text else None

    def feed(self, data: bytes, now: float) -> bool:
        """Take one network read; False when the stream carried an error event."""
        if self.pending:
            data = self.pending + data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.pending = data
            return True
        block = data[: cut + 2]
        self.pending = data[cut + 2 :]
        out = self.out
        # Chunks that came in one read arrived together: the first is timed, the rest are 0 s behind it.
        n = len(_CONTENT.findall(block))
        if n:
            if self.first:
                out.itl.append(now - self.last)
            else:
                self.first = now
            if n > 1:
                out.itl.extend([0.0] * (n - 1))
            self.last = now
            out.content_chunks += n
            if self.raw is not None:
                self.raw.append(block)
        if (usage := _usage_event(block)) is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                _apply_usage(out, orjson.loads(usage).get("usage"))
        if b'"error"' in block and (detail := _stream_error(block)) is not None:
            out.error = "stream_error"
            out.error_detail = detail
            return False
        return True

    def finish(self, now: float) -> bool:
        """Take what followed the last blank line: a last event may come without one."""
        if self.pending.strip():
            pending, self.pending = self.pending, b""
            return self.feed(pending + b"\n\n", now)
        return True


async def request_streamed(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    out: RequestOutput,
    api: Api,
    keep_text: bool,
) -> None:
    """POST a streamed request and time its chunks: TTFT at the first content chunk, ITL between them.

    With `keep_text`, the answer's text is kept when the server sends no `usage`, for a tokenizer to count.
    """
    timer = _StreamTimer(out, keep_text)
    feed = timer.feed
    start = out.start = perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = f"http_{resp.status}"
                out.error_detail = (await resp.text(errors="replace"))[:300]
                out.latency = perf_counter() - start
                return
            async for data in resp.content.iter_any():
                if not feed(data, perf_counter()):
                    out.latency = perf_counter() - start
                    return
            end = perf_counter()
            if not timer.finish(end):
                out.latency = end - start
                return
    except Exception as exc:  # every failure is counted by its kind; none ends the run
        out.error = _error_code(exc)
        out.error_detail = str(exc)[:300] or type(exc).__name__
        out.latency = perf_counter() - start
        return
    out.latency = end - start
    if not timer.first:
        out.error = "empty_response"
        return
    out.ttft = timer.first - start
    out.success = True
    if not out.usage_seen:
        out.output_tokens = out.content_chunks
        if timer.raw is not None:
            out.text = _text_of(_events(b"".join(timer.raw)), api)


async def request_whole(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    out: RequestOutput,
    api: Api,
    keep_text: bool,
) -> None:
    """POST a non-streamed request; the first token arrives with the last, so TTFT is the whole latency."""
    start = out.start = perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            out.status = resp.status
            payload = await resp.read()
    except Exception as exc:  # every failure is counted by its kind; none ends the run
        out.error = _error_code(exc)
        out.error_detail = str(exc)[:300] or type(exc).__name__
        out.latency = perf_counter() - start
        return
    out.latency = out.ttft = perf_counter() - start
    if out.status != 200:
        out.error = f"http_{out.status}"
        out.error_detail = payload[:300].decode(errors="replace")
        return
    try:
        message = orjson.loads(payload)
        choice = message["choices"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        out.error = "invalid_response"
        out.error_detail = payload[:300].decode(errors="replace")
        return
    _apply_usage(out, message.get("usage"))
    if keep_text or not out.usage_seen:
        text = (choice.get("message") or {}).get("content") if api is Api.CHAT else choice.get("text")
        out.text = text if isinstance(text, str) else ""
    out.success = True
