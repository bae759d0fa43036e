"""The HTTP/1.1 protocol uvicorn serves the gateway with: uvicorn's httptools (llhttp) protocol, with the request
head bounded and the answers it gives before the application sees a request in the OpenAI error shape.

llhttp puts no bound on a request line or a header, and httptools grows a header's value by concatenation as its
pieces arrive, so a 120 MB header costs time quadratic in its size on the one event loop every client shares.
Here a head is refused as soon as more of it has arrived than the bound, one read at a time, before it is whole.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import ServerSettings
from gateway.errors import GatewayError, HeadersTooLarge, InvalidHttpRequest, UriTooLong


class _HeadRefused(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with ``max_head_bytes`` and ``max_headers`` enforced as the head arrives."""

    max_head_bytes = 64 * 1024
    max_headers = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True
        # Bytes read while the head was incomplete (the bound across reads), and the size of the head parsed so
        # far (the bound within one read, which may hold a whole head and more).
        self._head_bytes = 0
        self._head_size = 0
        self._header_count = 0
        self._refusal: GatewayError | None = None

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_open and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse(self._head_too_large())

    def _head_too_large(self) -> GatewayError:
        if len(getattr(self, "url", b"")) > self.max_head_bytes // 2:
            return UriTooLong(f"The request line is longer than the limit of {self.max_head_bytes // 2} bytes.")
        return HeadersTooLarge(f"The request's headers are larger than the limit of {self.max_head_bytes} bytes.")

    def _refuse_in_parser(self, error: GatewayError) -> None:
        # Raised inside a parser callback, it stops the parser; uvicorn then calls send_400_response below.
        self._refusal = error
        raise _HeadRefused

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._head_size = 0
        self._header_count = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)
        if self._head_size > self.max_head_bytes:
            self._refuse_in_parser(self._head_too_large())

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        if self._header_count > self.max_headers:
            self._refuse_in_parser(HeadersTooLarge(f"The request has more than {self.max_headers} headers."))
        if self._head_size > self.max_head_bytes:
            self._refuse_in_parser(self._head_too_large())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_bytes = 0
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """What uvicorn answers when llhttp refuses the request (or a callback above refused it)."""
        refusal, self._refusal = self._refusal, None
        self._refuse(
            refusal
            or InvalidHttpRequest(
                "The request is not valid HTTP/1.1: a malformed request line, an unknown method, or a malformed header."
            )
        )

    def _refuse(self, error: GatewayError) -> None:
        body = orjson.dumps(error.body())
        head = [f"HTTP/1.1 {error.status} {_REASONS[error.status]}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()
        self._head_open = False


_REASONS = {400: "Bad Request", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


def protocol(settings: ServerSettings) -> type[asyncio.Protocol]:
    """The protocol class uvicorn is given (``http=``), bounded by ``settings`` in this process.

    One importable class rather than one made per configuration: under ``serve --workers N`` uvicorn pickles its
    configuration, class included, to start each serving process, and a class is pickled by its importable name.
    Each serving process calls this with the configuration it loaded, before it accepts a connection.
    """
    BoundedHttpToolsProtocol.max_head_bytes = settings.max_header_bytes
    BoundedHttpToolsProtocol.max_headers = settings.max_headers
    return BoundedHttpToolsProtocol


class UpgradesAnsweredAsHttp:
    """ASGI middleware: a WebSocket upgrade to a route that does not speak WebSocket is answered as the plain HTTP
    request it also is (the route's own answer, through the server's denial response), not with a bare close.

    Only the routes under ``websocket_prefixes`` (the nodes' channels) speak WebSocket.
    """

    def __init__(self, app: ASGIApp, websocket_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.websocket_prefixes = websocket_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or scope["path"].startswith(self.websocket_prefixes):
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1003})
            return
        plain = {**scope, "type": "http", "method": "GET", "scheme": "https" if scope["scheme"] == "wss" else "http"}
        plain.pop("subprotocols", None)

        async def no_body() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def as_denial(message: Message) -> None:
            kind = message["type"].removeprefix("http.")
            if kind in ("response.start", "response.body"):
                await send({**message, "type": f"websocket.http.{kind}"})

        await self.app(plain, no_body, as_denial)
