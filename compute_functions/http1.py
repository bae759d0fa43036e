"""A small HTTP/1.1 client with kept-alive connections, for talking to one model server from a worker.

A batch's hot loop: a general-purpose async client spends more CPU per request than the model server's own answer
costs the simulator, and the batch's throughput would be that client's. It speaks what OpenAI-compatible servers
answer (a length or chunked body, keep-alive) and nothing more; standard library only, as it runs on workers.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit


class ServerUnreachable(Exception):
    """Nothing accepts connections at the server's address."""


@dataclass
class Answer:
    status: int
    request_id: str
    body: bytes


class Http:
    """POSTs to one server over kept-alive connections; ``ServerUnreachable`` when it cannot connect."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        host_header = parts.netloc.rsplit("@", 1)[-1]
        fixed = {"host": host_header, "content-type": "application/json", **{k.lower(): v for k, v in headers.items()}}
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._ssl = ssl.create_default_context() if self.tls else None

    async def post(self, op: str, body: bytes) -> Answer:
        head = b"POST %s/%s HTTP/1.1\r\n%scontent-length: %d\r\n\r\n" % (
            self.prefix.encode(),
            op.encode(),
            self._headers,
            len(body),
        )
        async with asyncio.timeout(self.timeout):
            while self._idle:
                reader, writer = self._idle.pop()
                try:
                    return await self._exchange(reader, writer, head + body)
                except (ConnectionError, asyncio.IncompleteReadError):
                    # A kept-alive connection the server had closed meanwhile: try another.
                    writer.close()
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl)
            except OSError as exc:
                raise ServerUnreachable(f"cannot connect to {self.host}:{self.port}: {exc}") from None
            return await self._exchange(reader, writer, head + body)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> Answer:
        try:
            writer.write(data)
            status_line, *headers = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[:-2]
            parts = status_line.split(b" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
            status = int(parts[1])
            length, chunked, close, request_id = -1, False, False, ""
            for header in headers:
                name, _, value = header.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = b"close" in value.lower()
                elif name == b"x-request-id":
                    request_id = value.strip().decode(errors="replace")
            if chunked:
                body = await self._chunks(reader)
            elif length >= 0:
                body = await reader.readexactly(length)
            else:
                body, close = await reader.read(), True
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return Answer(status, request_id, body)

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> bytes:
        pieces: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(pieces)
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
