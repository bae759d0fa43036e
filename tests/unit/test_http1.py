"""The HTTP/1.1 client of the direct transport and the batch worker, against real servers on loopback ports."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from backend_http.client import ConnectionBroken, Http, ServerUnreachable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


async def _serve(handler: Handler) -> tuple[asyncio.Server, str, list[int]]:
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1", connections


# The head of a streamed answer in chunks, and one chunk.
_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_answer(body: bytes, *extra: bytes) -> bytes:
    headers = b"".join(extra)
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s" % (
        headers,
        len(body),
        body,
    )


async def test_kept_alive_connection_serves_many_requests() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await _read_request(reader)
            assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
            writer.write(_json_answer(b'{"ok": true}', b"x-request-id: r1\r\n"))

    server, url, connections = await _serve(handler)
    async with server:
        http = Http(url, {"authorization": "Bearer key"}, 5.0)
        answers = [await http.post("chat/completions", b"{}") for _ in range(5)]
        http.close()
    assert [(a.status, a.request_id, a.body) for a in answers] == [(200, "r1", b'{"ok": true}')] * 5
    assert len(connections) == 1


async def test_a_kept_alive_connection_the_server_closed_is_replaced_without_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        # Answered as kept alive, then closed: what a server does when its idle timeout ends.
        writer.write(_json_answer(b"{}"))
        await writer.drain()

    server, url, connections = await _serve(handler)
    async with server:
        http = Http(url, {}, 5.0)
        for _ in range(3):
            assert (await http.post("completions", b"{}")).status == 200
            await asyncio.sleep(0.05)
        http.close()
    assert len(connections) == 3


async def test_a_chunked_stream_arrives_piece_by_piece() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    server, url, _ = await _serve(handler)
    async with server:
        http = Http(url, {}, read_timeout=5.0)
        reply = await http.request("POST", "chat/completions", b"{}")
        assert reply.status == 200 and reply.content_type == "text/event-stream"
        pieces = reply.pieces()
        assert await anext(pieces) == b"data: 1\n\n"  # before the server sends the rest
        release.set()
        assert [piece async for piece in pieces] == [b"data: 2\n\n"]
        reply.close()
        http.close()


async def test_a_body_that_ends_with_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"a":')
        await writer.drain()
        writer.write(b" 1}")

    server, url, _ = await _serve(handler)
    async with server:
        http = Http(url, {}, 5.0)
        answer = await http.post("embeddings", b"{}")
        http.close()
    assert answer.body == b'{"a": 1}'


async def test_nothing_listening_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    http = Http(f"http://127.0.0.1:{port}/v1", {}, connect_timeout=2.0)
    with pytest.raises(ServerUnreachable, match="cannot connect"):
        await http.request("POST", "completions", b"{}")


async def test_the_read_timeout_bounds_each_silence_not_the_whole_answer() -> None:
    # Events 0.1 s apart for 0.5 s in all, read with a timeout of 0.25 s: never silent that long, so read whole;
    # then a silence of a second in the middle of the next answer times out.
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_SSE_HEAD)
        for n in range(5):
            await asyncio.sleep(0.1)
            event = b"data: %d\n\n" % n
            writer.write(_chunk(event))
        writer.write(b"0\r\n\r\n")
        await _read_request(reader)
        writer.write(_SSE_HEAD)
        writer.write(b"9\r\ndata: 0\n\n\r\n")
        await asyncio.sleep(1.0)

    server, url, _ = await _serve(trickle)
    async with server:
        http = Http(url, {}, read_timeout=0.25)
        reply = await http.request("POST", "completions", b"{}")
        assert await reply.read() == b"".join(b"data: %d\n\n" % n for n in range(5))
        reply.close()
        reply = await http.request("POST", "completions", b"{}")
        pieces = reply.pieces()
        assert await anext(pieces) == b"data: 0\n\n"
        with pytest.raises(TimeoutError):
            await anext(pieces)
        reply.close()
        http.close()


async def test_a_delivered_body_reaches_its_sink_as_it_arrives_and_each_silence_is_bounded() -> None:
    # The server sends the rest of the first answer only once the sink has the first event: delivery that waited
    # for the end would stall until the timeout. The events then come 0.1 s apart, read with a timeout of 0.25 s.
    seen = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_SSE_HEAD)
        writer.write(b"9\r\ndata: 0\n\n\r\n")
        await seen.wait()
        for n in range(1, 5):
            await asyncio.sleep(0.1)
            event = b"data: %d\n\n" % n
            writer.write(_chunk(event))
        writer.write(b"0\r\n\r\n")
        await _read_request(reader)
        writer.write(_SSE_HEAD)
        writer.write(b"9\r\ndata: 0\n\n\r\n")
        await asyncio.sleep(1.0)

    server, url, connections = await _serve(handler)
    async with server:
        http = Http(url, {}, read_timeout=0.25)
        received: list[bytes] = []

        def sink(piece: bytes) -> None:
            received.append(piece)
            seen.set()

        reply = await http.request("POST", "completions", b"{}")
        await reply.deliver(sink)
        reply.close()
        assert b"".join(received) == b"".join(b"data: %d\n\n" % n for n in range(5))
        received.clear()
        reply = await http.request("POST", "completions", b"{}")  # on the same, kept-alive connection
        with pytest.raises(TimeoutError):
            await reply.deliver(sink)
        reply.close()
        http.close()
    assert received == [b"data: 0\n\n"]
    assert len(connections) == 1

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")

    server, url, _ = await _serve(cut)
    async with server:
        http = Http(url, {}, read_timeout=5.0)
        reply = await http.request("POST", "completions", b"{}")
        received.clear()
        with pytest.raises(ConnectionBroken):
            await reply.deliver(received.append)
        reply.close()
    assert b"".join(received) == b"short"


async def test_a_silent_server_times_out_and_a_cut_answer_is_broken() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    server, url, _ = await _serve(silent)
    async with server:
        http = Http(url, {}, read_timeout=0.2)
        with pytest.raises(TimeoutError):
            await http.request("POST", "completions", b"{}")

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")

    server, url, _ = await _serve(cut)
    async with server:
        http = Http(url, {}, read_timeout=5.0)
        reply = await http.request("POST", "completions", b"{}")
        with pytest.raises(ConnectionBroken):
            await reply.read()
        reply.close()


async def test_connections_are_limited_and_given_back() -> None:
    inside = 0
    most = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal inside, most
        while True:
            await _read_request(reader)
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.02)
            inside -= 1
            writer.write(_json_answer(b"{}"))

    server, url, connections = await _serve(handler)
    async with server:
        http = Http(url, {}, 5.0, max_connections=2)
        answers = await asyncio.gather(*(http.post("completions", b"{}") for _ in range(8)))
        http.close()
    assert all(answer.status == 200 for answer in answers)
    assert most <= 2 and len(connections) <= 2


# --- strict where a lenient parser lets a broken or hostile answer through ---------------------------------------


async def _answer_with(raw: bytes) -> tuple[int, bytes]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(raw)
        await writer.drain()
        await reader.read()

    server, url, _ = await _serve(handler)
    async with server:
        http = Http(url, {}, read_timeout=5.0)
        reply = await http.request("POST", "completions", b"{}")
        try:
            return reply.status, await reply.read()
        finally:
            reply.close()
            http.close()


CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        CHUNKED + b"3\r\nabcXY0\r\n\r\n",  # a chunk not followed by CRLF
        CHUNKED + b"0x3\r\nabc\r\n0\r\n\r\n",  # not a hexadecimal chunk size
        CHUNKED + b"-3\r\nabc\r\n0\r\n\r\n",
        CHUNKED + b"fffffffffffffffffffff\r\n",  # a chunk size past 64 bits
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 5\r\n\r\nabcde",
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nx: a\rb\r\ncontent-length: 3\r\n\r\nabc",  # a bare CR inside a header
        b"HTTP/1.1 200 OK\ncontent-length: 3\n\nabc",  # LF alone ends no line in an answer
        b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-%d: v\r\n" % n for n in range(101)) + b"content-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-long: " + b"a" * 70_000 + b"\r\ncontent-length: 0\r\n\r\n",
    ],
)
async def test_a_malformed_answer_is_a_broken_connection(raw: bytes) -> None:
    with pytest.raises(ConnectionBroken):
        await _answer_with(raw)


async def test_interim_answers_are_passed_over_for_the_final_one() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    assert await _answer_with(interim + _json_answer(b"{}")) == (200, b"{}")


async def test_chunk_extensions_and_trailers_are_read_past() -> None:
    raw = CHUNKED + b"3;name=value\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n"
    assert await _answer_with(raw) == (200, b"abcde")


async def test_an_http_1_0_answer_is_not_kept_alive() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_request(reader)
            writer.write(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\n{}")

    server, url, connections = await _serve(handler)
    async with server:
        http = Http(url, {}, 5.0)
        for _ in range(3):
            assert (await http.post("completions", b"{}")).body == b"{}"
        http.close()
    assert len(connections) == 3


def test_a_line_break_in_a_header_or_path_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="line break"):
        Http("http://127.0.0.1:1/v1", {"authorization": "Bearer key\r\nx-admin: yes"})
    http = Http("http://127.0.0.1:1/v1", {})
    with pytest.raises(ValueError):
        asyncio.run(http.request("POST", "completions\r\nx: y", b"{}"))


async def test_a_post_is_not_sent_twice_when_its_kept_alive_connection_closes() -> None:
    seen = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        while True:
            await _read_request(reader)
            seen += 1
            if seen == 2:
                # Took the second request, then went away without answering: it may have done the work.
                writer.transport.abort()
                return
            writer.write(_json_answer(b"{}"))

    server, url, connections = await _serve(handler)
    async with server:
        http = Http(url, {}, 5.0)
        assert (await http.post("completions", b"{}")).status == 200
        with pytest.raises(ConnectionBroken):
            await http.post("completions", b"{}")
        http.close()
    assert seen == 2 and len(connections) == 1


# --- through a site's proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) ------------------------------------------------


async def _proxy() -> tuple[asyncio.Server, int, list[bytes]]:
    """A forward proxy, as sites run them: CONNECT tunnels for HTTPS, absolute URLs for plain HTTP."""
    seen: list[bytes] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0]
        seen.append(line)
        method, target, _ = line.split(b" ")
        if method == b"CONNECT":
            host, port = target.rsplit(b":", 1)
            upstream_reader, upstream_writer = await asyncio.open_connection(host.decode(), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            parts = target.split(b"/", 3)  # http:, '', host:port, path
            host, port = parts[2].rsplit(b":", 1)
            upstream_reader, upstream_writer = await asyncio.open_connection(host.decode(), int(port))
            upstream_writer.write(head)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def _proxy_environment(monkeypatch: pytest.MonkeyPatch, port: int, no_proxy: str = "") -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{port}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", no_proxy)


async def _echo_server(context: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int, list[bytes]]:
    lines: list[bytes] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                lines.append(request.split(b"\r\n", 1)[0])
                writer.write(_json_answer(b'{"ok": true}'))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1], lines


async def test_plain_http_goes_through_the_proxy_and_no_proxy_bypasses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy, proxy_port, seen = await _proxy()
    server, port, lines = await _echo_server()
    async with proxy, server:
        _proxy_environment(monkeypatch, proxy_port)
        http = Http(f"http://127.0.0.1:{port}/v1", {}, 5.0)
        assert (await http.post("completions", b"{}")).body == b'{"ok": true}'
        http.close()
        assert seen == [f"POST http://127.0.0.1:{port}/v1/completions HTTP/1.1".encode()]
        _proxy_environment(monkeypatch, proxy_port, no_proxy="127.0.0.1")
        http = Http(f"http://127.0.0.1:{port}/v1", {}, 5.0)
        assert (await http.post("completions", b"{}")).status == 200
        http.close()
    assert len(seen) == 1 and lines[-1] == b"POST /v1/completions HTTP/1.1"


async def test_https_goes_through_a_connect_tunnel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    proxy, proxy_port, seen = await _proxy()
    server, port, lines = await _echo_server(context)
    async with proxy, server:
        _proxy_environment(monkeypatch, proxy_port)
        # The server's certificate is trusted as a site's own CA would be.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        http = Http(f"https://localhost:{port}/v1", {}, 5.0)
        answers = [await http.post("chat/completions", b"{}") for _ in range(3)]
        http.close()
    assert [answer.body for answer in answers] == [b'{"ok": true}'] * 3
    # One tunnel, kept alive for the three requests; the proxy saw nothing but the CONNECT.
    assert seen == [f"CONNECT localhost:{port} HTTP/1.1".encode()]
    assert lines == [b"POST /v1/chat/completions HTTP/1.1"] * 3


async def test_a_connection_is_kept_as_long_as_the_server_says_it_keeps_it() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_request(reader)
            writer.write(_json_answer(b"{}", b"keep-alive: timeout=60, max=100\r\n"))

    server, url, connections = await _serve(handler)
    async with server:
        http = Http(url, {}, 5.0)
        assert (await http.post("completions", b"{}")).status == 200
        # Idle longer than the 2 s kept without the header: still used, since the server keeps it for 60 s.
        http._idle[0].idle_since -= 10
        assert (await http.post("completions", b"{}")).status == 200
        http.close()
    assert len(connections) == 1


async def test_a_connection_idle_for_long_is_not_used_again() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_request(reader)
            writer.write(_json_answer(b"{}"))

    server, url, connections = await _serve(handler)
    async with server:
        http = Http(url, {}, 5.0)
        assert (await http.post("completions", b"{}")).status == 200
        http._idle[0].idle_since -= 10
        assert (await http.post("completions", b"{}")).status == 200
        http.close()
    assert len(connections) == 2


async def test_a_body_with_a_transfer_coding_other_than_chunked_ends_with_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n{}")

    server, url, _ = await _serve(handler)
    async with server:
        http = Http(url, {}, 5.0)
        assert (await http.post("embeddings", b"{}")).body == b"{}"
        http.close()


def test_the_client_and_the_worker_package_load_nothing_of_the_server() -> None:
    # Worker nodes have the client and compute_functions, never the server: neither may reach into gateway.
    probe = (
        "import json, sys, backend_http.client; before = sorted(sys.modules); "
        "import compute_functions.inference, compute_functions.batch, compute_functions.status; "
        "print(json.dumps([before, sorted(sys.modules)]))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    client, worker = json.loads(loaded)
    assert not [name for name in client if name.split(".")[0] in ("gateway", "compute_functions")]
    assert not [name for name in worker if name.split(".")[0] == "gateway"]
