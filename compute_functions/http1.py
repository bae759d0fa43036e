"""A small HTTP/1.1 client with kept-alive connections, for talking to OpenAI-compatible servers.

A general-purpose async client spends more CPU per request than a model server's own answer costs a fast backend,
and every microsecond of it sits between a scientist and the first token. This one speaks what OpenAI-compatible
servers answer (a length, chunked or close-delimited body, keep-alive) and nothing more: the gateway's ``direct``
transport and a batch's worker both use it. Standard library only, as it runs on workers too.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

# Past this many unread bytes the connection stops reading until the consumer catches up.
_HIGH_WATER = 1 << 20
# An upload reuses a kept-alive connection only this soon after its last answer (see ``Http.upload``).
_FRESH = 2.0


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


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: bytes in a buffer, and a way to wait for more."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.received = 0
        self.closed = False
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self, patience: float | None) -> None:
        """Wait until more bytes arrive (or the server closes); ``TimeoutError`` after ``patience`` seconds."""
        if self.closed:
            raise ConnectionBroken("the server closed the connection")
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.waiter = waiter = self.loop.create_future()
        timer = self.loop.call_later(patience, _expire, waiter) if patience is not None else None
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def line(self, patience: float | None, limit: int = 65536) -> bytes:
        """The bytes up to the next CRLF, without it."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > limit:
                raise ConnectionBroken("a header or chunk-size line is too long")
            await self.more(patience)
        line = self.take(end)
        del self.buffer[:2]
        return line

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Reply:
    """A server's answer whose status and headers have arrived; the body is read with ``read`` or ``pieces``.

    ``close`` must be called once, whether or not the body was read: a connection whose body was read to the
    end goes back to the pool, any other is closed.
    """

    def __init__(self, http: Http, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self._http = http
        self._connection: _Connection | None = connection
        self.status = status
        self.headers = headers
        self._finished = False

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self.pieces()])

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive: whatever is buffered at each moment, joined into one piece."""
        connection = self._connection
        if connection is None or self._finished:
            return
        patience = self._http.read_timeout
        if self.status in (204, 304):
            self._finished = True
            return
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            async for piece in self._chunked(connection, patience):
                yield piece
        elif (declared := self.headers.get("content-length")) is not None:
            remaining = int(declared)
            while remaining > 0:
                if not connection.buffer:
                    await connection.more(patience)
                    continue
                piece = connection.take(remaining)
                remaining -= len(piece)
                yield piece
        else:
            # The body ends where the connection does.
            while True:
                if connection.buffer:
                    yield connection.take(len(connection.buffer))
                elif connection.closed:
                    break
                else:
                    try:
                        await connection.more(patience)
                    except ConnectionBroken:
                        break
            self.headers["connection"] = "close"
        self._finished = True

    async def _chunked(self, connection: _Connection, patience: float | None) -> AsyncIterator[bytes]:
        buffer = connection.buffer
        while True:
            # Every chunk already buffered goes out as one piece: events that arrived together leave together.
            pieces: list[bytes] = []
            while True:
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                try:
                    size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise ConnectionBroken(f"bad chunk size line {bytes(buffer[:40])!r}") from None
                if size == 0:
                    del buffer[: end + 2]
                    if pieces:
                        yield b"".join(pieces)
                    while await connection.line(patience):
                        pass  # trailers
                    return
                if len(buffer) < end + 2 + size + 2:
                    break
                pieces.append(bytes(buffer[end + 2 : end + 2 + size]))
                del buffer[: end + 2 + size + 2]
            if pieces:
                yield b"".join(pieces)
            await connection.more(patience)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        reusable = self._finished and "close" not in self.headers.get("connection", "").lower()
        self._http._release(connection, reusable)


class Http:
    """Requests to one server over kept-alive connections, at most ``max_connections`` at a time.

    ``ServerUnreachable`` when it cannot connect (within ``connect_timeout``), ``TimeoutError`` when the server
    stays silent for ``read_timeout`` seconds, ``ConnectionBroken`` when the answer is cut or is not HTTP.
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
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl = ssl.create_default_context() if self.tls else None

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
        head = b"%s %s HTTP/1.1\r\n%s" % (method.encode(), path.encode(), self._headers)
        if body is not None:
            head += b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
            data = head + body
        else:
            data = head + b"\r\n"
        await self._slots.acquire()
        try:
            while self._idle:
                connection = self._idle.pop()
                if connection.closed:
                    continue
                try:
                    return await self._exchange(connection, data)
                except ConnectionBroken:
                    # A kept-alive connection the server closed meanwhile: nothing of an answer came, so the
                    # server never took the request, and it goes again on another connection.
                    if connection.received:
                        raise
            return await self._exchange(await self._connect(), data)
        except BaseException:
            self._slots.release()
            raise

    async def upload(self, op: str, pieces: AsyncIterator[bytes], headers: dict[str, str]) -> Reply:
        """POST ``pieces`` to ``{base_url}/{op}`` as a chunked body, each sent as it comes, and wait for the answer.

        A body that is being produced cannot be sent again should a kept-alive connection turn out closed, so only
        one used in the last ``_FRESH`` seconds is reused (servers keep idle connections open for longer; uvicorn
        5 s), else a new one is made. A server that answers before the body ends (it refuses it) stops the sending.
        """
        path = op if op.startswith("/") else f"{self.prefix}/{op}"
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
        head = b"POST %s HTTP/1.1\r\n%s%stransfer-encoding: chunked\r\n\r\n" % (path.encode(), self._headers, extra)
        await self._slots.acquire()
        try:
            connection = None
            fresh = time.monotonic() - _FRESH
            while self._idle and connection is None:
                candidate = self._idle.pop()
                if not candidate.closed and candidate.idle_since > fresh:
                    connection = candidate
                else:
                    candidate.close()
            if connection is None:
                connection = await self._connect()
            ended = False
            try:
                assert connection.transport is not None
                connection.transport.write(head)
                async for piece in pieces:
                    if connection.closed or connection.buffer:
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
                reply.headers["connection"] = "close"
            return reply
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port, ssl=self._ssl
                )
        except TimeoutError:
            raise ServerUnreachable(f"no connection to {self.host}:{self.port} in {self.connect_timeout} s") from None
        except OSError as exc:
            raise ServerUnreachable(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return connection

    async def _exchange(self, connection: _Connection, data: bytes) -> Reply:
        assert connection.transport is not None
        connection.transport.write(data)
        return await self._answer(connection)

    async def _answer(self, connection: _Connection) -> Reply:
        try:
            status_line = await connection.line(self.read_timeout)
            parts = status_line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ConnectionBroken(f"not an HTTP answer: {status_line[:80]!r}")
            headers: dict[str, str] = {}
            while line := await connection.line(self.read_timeout):
                name, _, value = line.partition(b":")
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        except BaseException:
            connection.close()
            raise
        return Reply(self, connection, int(parts[1]), headers)

    def _release(self, connection: _Connection, reusable: bool) -> None:
        self._slots.release()
        if reusable and not connection.closed and not connection.buffer:
            connection.received = 0
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
