"""A small HTTP/1.1 client with kept-alive connections, for talking to OpenAI-compatible servers.

A general-purpose async client spends more CPU per request than a model server's own answer costs a fast backend,
and every microsecond of it sits between a scientist and the first token. This one keeps only what the gateway's
``direct`` transport and the workers (inference, batches) need (a pool of kept-alive connections, bodies as they
arrive) and
leaves the parsing of answers to llhttp (Node's HTTP parser, through ``httptools``), which is strict where a hand
parser is lenient: chunk sizes and terminators, duplicate ``Content-Length``, line endings, header syntax.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httptools

# Past this many unread body bytes the connection stops reading until the consumer catches up.
_HIGH_WATER = 1 << 20
# An answer's status line and headers together, and how many headers, at most.
_MAX_HEAD_BYTES = 64 * 1024
_MAX_HEADERS = 100
# A kept-alive connection idle longer than this is not used again: servers close idle connections (uvicorn, and so
# vLLM, after 5 s), and a request written as the server closes may or may not have been taken, so it cannot simply
# be sent again. A server that says how long it keeps connections (``Keep-Alive: timeout=N``) is taken at its word,
# less a second.
_MAX_IDLE_SECONDS = 2.0
# Answers whose body ends where the connection does, when they have neither length nor chunks.
_NO_BODY = frozenset({204, 304})


class ServerUnreachable(Exception):
    """Nothing accepts connections at the server's address (refused, unresolvable or no answer in time)."""


class ConnectionBroken(ConnectionError):
    """The server closed the connection, or sent something that is not an HTTP/1.1 answer."""


@dataclass
class Answer:
    status: int
    request_id: str
    body: bytes


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _idle_limit(keep_alive: str | None) -> float:
    """How long a connection may stay idle and still be used, from the answer's ``Keep-Alive`` header if any."""
    for part in (keep_alive or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "timeout" and value.strip().isdigit():
            return max(0.0, int(value) - 1.0)
    return _MAX_IDLE_SECONDS


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection, its answers parsed by llhttp as the bytes arrive, and a way to wait for more."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        # The wait's deadline, and the one alarm that checks it (see ``more``).
        self.deadline = 0.0
        self.alarm: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        self.max_idle = _MAX_IDLE_SECONDS
        self.error: ConnectionBroken | None = None
        # Where the body goes, straight from ``data_received``, while a reader ``deliver``s it (see ``Reply``).
        self.sink: Callable[[bytes], None] | None = None
        self.patience: float | None = None
        self.expect()

    def expect(self) -> None:
        """Get ready for the answer to a request about to be written."""
        self.received = 0
        self.head_bytes = 0
        self.head_size = 0
        self.headers: dict[str, str] = {}
        self.status = 0
        self.head_done = False
        self.interim = False
        self.body = bytearray()
        self.complete = False
        self.keep_alive = False
        self.awaiting = True

    # asyncio.Protocol -------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(self.error or ConnectionBroken(f"not a valid HTTP/1.1 answer: {exc}"))
            return
        if not self.head_done and self.head_bytes > _MAX_HEAD_BYTES:
            self._fail(ConnectionBroken(f"the answer's headers are longer than {_MAX_HEAD_BYTES} bytes"))
            return
        if self.sink is not None:
            if self.complete:
                # The reader is woken before the sink gets the last bytes, so its next step (what it does at the
                # end) runs before anything those bytes wake: a sink that sends on once per turn sends both at once.
                self._wake()
            if self.body:
                # Bytes are news: the silence limit counts from now on, and nobody needs waking for them.
                if self.patience is not None:
                    self.deadline = self.loop.time() + self.patience
                self.sink(self.take())
            return
        elif len(self.body) > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.alarm is not None:
            self.alarm.cancel()
            self.alarm = None
        self._wake()

    # llhttp's callbacks ------------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.awaiting:
            # Bytes after the end of the answer, before any new request: nothing this connection can be used for.
            self.error = ConnectionBroken("the server sent more than its answer")
            raise self.error

    def on_header(self, name: bytes, value: bytes) -> None:
        # What arrived in one read may hold a whole head: its size is checked here as well as across reads.
        self.head_size += len(name) + len(value) + 4
        if len(self.headers) >= _MAX_HEADERS or self.head_size > _MAX_HEAD_BYTES:
            self.error = ConnectionBroken(
                f"the answer has more than {_MAX_HEADERS} headers or {_MAX_HEAD_BYTES} bytes of them"
            )
            raise self.error
        key = name.lower().decode("latin-1")
        text = value.decode("latin-1")
        # Repeated fields are one list (RFC 9110, 5.3); llhttp has already refused a repeated Content-Length.
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows on the same connection.
            self.interim = True
            self.headers = {}
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"
        self.max_idle = _idle_limit(self.headers.get("keep-alive"))
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self.awaiting = False

    # ----------------------------------------------------------------------------------------------------------

    def _fail(self, error: ConnectionBroken) -> None:
        self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self, patience: float | None) -> None:
        """Wait until more bytes arrive (or the server closes); ``TimeoutError`` after ``patience`` seconds."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ConnectionBroken("the server closed the connection")
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.waiter = waiter = self.loop.create_future()
        if patience is not None:
            # A streamed answer waits once per event: moving a deadline costs less than a timer armed and cancelled
            # each time. The alarm rings at the earliest deadline set since it was armed and moves itself on.
            self.deadline = self.loop.time() + patience
            if self.alarm is None or self.alarm.when() > self.deadline:
                if self.alarm is not None:
                    self.alarm.cancel()
                self.alarm = self.loop.call_at(self.deadline, self._ring)
        try:
            await waiter
        finally:
            self.waiter = None

    def _ring(self) -> None:
        self.alarm = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait sets its own deadline
        if self.loop.time() >= self.deadline:
            _expire(waiter)
        else:
            self.alarm = self.loop.call_at(self.deadline, self._ring)

    def take(self) -> bytes:
        data = bytes(self.body)
        self.body.clear()
        return data

    def close(self) -> None:
        self.closed = True
        if self.alarm is not None:
            self.alarm.cancel()
            self.alarm = None
        if self.transport is not None:
            self.transport.close()


class _Tunnel(asyncio.Protocol):
    """A proxy's answer to ``CONNECT``: its head only, then the connection is the tunnel."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head = bytearray()
        self.done: asyncio.Future[bytes] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end >= 0 and not self.done.done():
            # A proxy sends nothing after its head until the tunnel carries the client's first bytes.
            self.done.set_result(bytes(self.head[: end + 4]))
        elif len(self.head) > _MAX_HEAD_BYTES and not self.done.done():
            self.done.set_exception(ConnectionBroken("the proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionBroken("the proxy closed the connection"))


class _Status:
    """Just the status of an answer's head, from llhttp."""

    def __init__(self, head: bytes) -> None:
        self.status = 0
        parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(head)
        except httptools.HttpParserError as exc:
            raise ConnectionBroken(f"the proxy's answer is not HTTP/1.1: {exc}") from None
        self.status = parser.get_status_code()


def _proxy_for(scheme: str, host: str) -> tuple[str, int, bytes] | None:
    """The proxy (host, port, Proxy-Authorization header line) that ``HTTPS_PROXY``/``HTTP_PROXY`` name for
    ``host``, unless ``NO_PROXY`` exempts it: as curl, httpx and pip read them."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    if not url or urllib.request.proxy_bypass(host):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", ""):
        raise ValueError(f"only http:// proxies are supported, not {url!r}")
    authorization = b""
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = b"proxy-authorization: Basic " + base64.b64encode(credentials) + b"\r\n"
    return parts.hostname or "127.0.0.1", parts.port or 80, authorization


class Reply:
    """A server's answer whose status and headers have arrived; the body is read with ``read`` or ``pieces``.

    ``close`` must be called once, whether or not the body was read: a connection whose body was read to the
    end goes back to the pool, any other is closed.
    """

    def __init__(self, http: Http, connection: _Connection) -> None:
        self._http = http
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.headers = connection.headers
        self._finished = False

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self.pieces()])

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive: whatever has been parsed at each moment, joined into one piece (events
        that arrived together leave together)."""
        connection = self._connection
        if connection is None or self._finished:
            return
        patience = self._http.read_timeout
        while True:
            if connection.body:
                yield connection.take()
            elif self._ended(connection):
                break
            else:
                await connection.more(patience)
        self._finished = True

    async def deliver(self, sink: Callable[[bytes], None]) -> None:
        """Hand the body's bytes to ``sink`` as they arrive, as ``pieces`` yields them, and return at its end.

        ``sink`` is called from the connection's own callback, so this task wakes only when the body ends: an event
        stream costs no task switch per event. ``sink`` must not raise, nor wait; the silence limit
        (``read_timeout``) counts from the last bytes.
        """
        connection = self._connection
        if connection is None or self._finished:
            return
        if connection.body:
            sink(connection.take())
        connection.sink, connection.patience = sink, self._http.read_timeout
        try:
            while not self._ended(connection):
                await connection.more(connection.patience)
        finally:
            connection.sink = None
        self._finished = True

    def _ended(self, connection: _Connection) -> bool:
        """Whether the body has ended (its bytes all taken); ``ConnectionBroken`` where it broke off instead."""
        if connection.complete:
            return True
        if connection.error is not None:
            raise connection.error
        if connection.closed:
            # Without a length or chunks the body ends where the connection does; llhttp cannot see that end for us.
            if not (
                self.status in _NO_BODY
                or "content-length" in self.headers
                or "chunked" in self.headers.get("transfer-encoding", "").lower()
            ):
                return True
            raise ConnectionBroken("the server closed the connection before the end of the answer")
        return False

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        reusable = self._finished and connection.complete and connection.keep_alive
        self._http._release(connection, reusable)


def _checked(text: str, what: str) -> str:
    # Written verbatim into the request, a CR or LF would end the header and start another one.
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError(f"{what} {text!r} contains a line break or NUL byte")
    return text


class Http:
    """Requests to one server over kept-alive connections, at most ``max_connections`` at a time.

    ``ServerUnreachable`` when it cannot connect (within ``connect_timeout``), ``TimeoutError`` when the server
    stays silent for ``read_timeout`` seconds, ``ConnectionBroken`` when the answer is cut or is not HTTP.
    A request is sent again on a new connection only when that is safe: a GET whose kept-alive connection turned
    out to be closed. A POST is never sent twice; connections idle for long are not reused, so that a server's
    idle timeout seldom meets a request.
    """

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        timeout: float | None = None,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_connections: int = 1000,
        proxy: bool = True,
    ) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self.read_timeout = read_timeout if read_timeout is not None else timeout
        host_header = parts.netloc.rsplit("@", 1)[-1]
        fixed = {"host": host_header, **{k.lower(): v for k, v in headers.items()}}
        self._headers = "".join(
            f"{_checked(name, 'header name')}: {_checked(value, 'header value')}\r\n" for name, value in fixed.items()
        ).encode()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl = ssl.create_default_context() if self.tls else None
        # ``proxy=False`` for a server on this node, which a site's proxy could not reach.
        self._proxy = _proxy_for("https" if self.tls else "http", self.host) if proxy else None
        # Through a proxy, plain HTTP names the whole URL in the request line; HTTPS goes through a CONNECT tunnel.
        self._origin = f"http://{host_header}" if self._proxy and not self.tls else ""
        if self._origin and self._proxy is not None:
            self._headers += self._proxy[2]

    async def post(self, op: str, body: bytes) -> Answer:
        """POST ``body`` (JSON) to ``{base_url}/{op}`` and read the whole answer, all within ``timeout``."""
        async with asyncio.timeout(self.timeout):
            reply = await self.request("POST", op, body)
            try:
                content = await reply.read()
            finally:
                reply.close()
        return Answer(reply.status, reply.headers.get("x-request-id", ""), content)

    async def request(self, method: str, op: str, body: bytes | None = None) -> Reply:
        """Send a request to ``{base_url}/{op}`` (JSON ``body`` if given) and wait for the answer's headers.

        An ``op`` that starts with ``/`` is a path from the server's root instead (``/metrics``).
        """
        path = op if op.startswith("/") else f"{self.prefix}/{op}"
        if " " in path:
            raise ValueError(f"path {path!r} contains a space")
        target = self._origin + _checked(path, "path")
        head = b"%s %s HTTP/1.1\r\n%s" % (method.encode(), target.encode(), self._headers)
        if body is not None:
            head += b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
            data = head + body
        else:
            data = head + b"\r\n"
        await self._slots.acquire()
        try:
            now = time.monotonic()
            while self._idle:
                connection = self._idle.pop()
                if connection.closed or now - connection.idle_since > connection.max_idle:
                    connection.close()
                    continue
                try:
                    return await self._exchange(connection, data)
                except ConnectionBroken:
                    # The server closed the kept-alive connection as the request went out. Whether it took the
                    # request nobody can tell, so only a request that may be repeated (GET) goes again.
                    if connection.received or method != "GET":
                        raise
            return await self._exchange(await self._connect(), data)
        except BaseException:
            self._slots.release()
            raise

    async def upload(self, op: str, pieces: AsyncIterator[bytes], headers: dict[str, str]) -> Reply:
        """POST ``pieces`` to ``{base_url}/{op}`` as a chunked body, each sent as it comes, and wait for the answer.

        A body that is being produced cannot be sent again should a kept-alive connection turn out closed, so a
        connection is reused only while the server surely keeps it (see ``_MAX_IDLE_SECONDS``), else a new one is
        made. A server that answers before the body ends (it refuses it) stops the sending.
        """
        path = op if op.startswith("/") else f"{self.prefix}/{op}"
        target = self._origin + _checked(path, "path")
        extra = "".join(f"{name}: {_checked(value, name)}\r\n" for name, value in headers.items()).encode()
        head = b"POST %s HTTP/1.1\r\n%s%stransfer-encoding: chunked\r\n\r\n" % (target.encode(), self._headers, extra)
        await self._slots.acquire()
        try:
            connection = None
            now = time.monotonic()
            while self._idle and connection is None:
                candidate = self._idle.pop()
                if not candidate.closed and now - candidate.idle_since <= candidate.max_idle:
                    connection = candidate
                else:
                    candidate.close()
            if connection is None:
                connection = await self._connect()
            ended = False
            try:
                assert connection.transport is not None
                connection.expect()
                connection.transport.write(head)
                async for piece in pieces:
                    if connection.closed or connection.received:
                        break
                    if piece:
                        connection.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    connection.transport.write(b"0\r\n\r\n")
                    ended = True
            except BaseException:
                connection.close()
                raise
            reply = await self._answer(connection)
            if not ended:
                # The request was cut short: whatever the server says, the connection cannot carry another.
                connection.keep_alive = False
            return reply
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = (self._proxy[0], self._proxy[1]) if self._proxy else (self.host, self.port)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._proxy is not None and self.tls:
                    return await self._tunnel(loop, host, port)
                _, connection = await loop.create_connection(lambda: _Connection(loop), host, port, ssl=self._ssl)
        except TimeoutError:
            raise ServerUnreachable(f"no connection to {host}:{port} in {self.connect_timeout} s") from None
        except OSError as exc:
            raise ServerUnreachable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return connection

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> _Connection:
        """A TLS connection to the server through the proxy at ``host``:``port`` (``CONNECT``)."""
        assert self._proxy is not None and self._ssl is not None
        transport, tunnel = await loop.create_connection(lambda: _Tunnel(loop), host, port)
        try:
            target = f"{self.host}:{self.port}".encode()
            transport.write(b"CONNECT %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (target, target, self._proxy[2]))
            status = _Status(await tunnel.done).status
            if status != 200:
                raise ServerUnreachable(
                    f"the proxy {host}:{port} refused to connect to {self.host}:{self.port}: {status}"
                )
            connection = _Connection(loop)
            secure = await loop.start_tls(transport, connection, self._ssl, server_hostname=self.host)
        except BaseException:
            transport.close()
            raise
        assert secure is not None
        connection.connection_made(secure)
        return connection

    async def _exchange(self, connection: _Connection, data: bytes) -> Reply:
        assert connection.transport is not None
        connection.expect()
        connection.transport.write(data)
        return await self._answer(connection)

    async def _answer(self, connection: _Connection) -> Reply:
        try:
            while not connection.head_done:
                await connection.more(self.read_timeout)
        except BaseException:
            connection.close()
            raise
        return Reply(self, connection)

    def _release(self, connection: _Connection, reusable: bool) -> None:
        self._slots.release()
        if reusable and not connection.closed:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
