"""The node's request server: one process that serves, all at once, the requests the node's workers hand it.

A Parsl or Globus Compute worker runs one task at a time, and a request spends nearly all its time waiting on the
model server: a worker process (~100 MB, a second of CPU to start) per request in flight would cost a node more
than the model server itself. So a worker hands the request over a Unix socket to this process and is free again
as soon as this process has taken it (an asyncio task per request); the task sends the outcome back to the gateway
itself.

The workers are not the servers on purpose: a worker waits for its next task holding a lock of its pool's task
queue, and one killed there stops the whole pool. This process can die alone; its requests' relay connections
break with it, so the gateway answers them with an error at once, and the next request starts a new one.

Its files sit in the node's state directory (see ``node``), named by how many requests it holds, ``held``:
``requests-HELD.sock``, ``requests-HELD.lock`` (held while one is started) and ``requests-HELD.log``; endpoints
that hold different numbers on one node get a server each. It serves at most ``held`` requests at once; a
hand-over waits while all are taken, so the worker stays busy and the rest wait in the pool's queue. It stops once
no worker process that handed it a request is alive and nothing is in flight.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from compute_functions import event_loop, json_codec
from compute_functions.model_server import tail
from compute_functions.node import PACKAGE_ROOT, locked
from compute_functions.processes import alive

_START_TIMEOUT = 30.0
_WATCH = 1.0
_TAKEN = b"taken\n"
# A group of requests, with their bodies (a long prompt, several in a group), on one line.
_LINE_LIMIT = 1 << 30


class HandOverFailed(RuntimeError):
    """No request server took the request; the message says why (with the end of its log when it did not start)."""


def hand_over(
    directory: Path, requests: list[dict[str, Any]], held: int, entry: str, starting: Callable[[], None]
) -> None:
    """Give ``requests`` to the request server in ``directory``, started first (``entry``) when none listens there.

    Returns once the server has taken them all. ``entry`` is Python code run as ``python -c entry
    PACKAGE_ROOT directory held worker_pid`` that calls ``serve``. ``starting()`` is called before a server is
    started, to start what the requests will need meanwhile rather than after.
    """
    path = directory / f"requests-{held}.sock"
    data = json_codec.dumps(requests) + b"\n"
    try:
        return _send(path, data)
    except (OSError, HandOverFailed):
        # None listens, or one that was stopping closed the connection without taking the request.
        starting()
        _start(directory, held, entry)
    try:
        return _send(path, data)
    except OSError as exc:
        raise HandOverFailed(f"the node's request server does not take requests: {exc}") from None


def _send(path: Path, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(str(path))
        connection.sendall(data)
        answer = b""
        while not answer.endswith(b"\n"):
            piece = connection.recv(64)
            if not piece:
                raise HandOverFailed("the node's request server closed the connection before taking the request")
            answer += piece
    if answer != _TAKEN:
        raise HandOverFailed(f"the node's request server answered {answer[:80]!r}")


def _start(directory: Path, held: int, entry: str) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path, log = directory / f"requests-{held}.sock", directory / f"requests-{held}.log"
    deadline = time.monotonic() + _START_TIMEOUT
    with locked(directory / f"requests-{held}.lock", deadline):
        try:
            _probe(path)
            return  # another worker started it meanwhile
        except OSError:
            path.unlink(missing_ok=True)
        with open(log, "wb") as output:
            server = subprocess.Popen(
                [sys.executable, "-c", entry, PACKAGE_ROOT, str(directory), str(held), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.monotonic() < deadline:
            try:
                _probe(path)
                return
            except OSError:
                pass
            if server.poll() is not None:
                break
            time.sleep(0.01)
        raise HandOverFailed(f"the node's request server did not start; its log ends with:\n{tail(log)}")


def _probe(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(str(path))


# Takes a piece of a request's answer to send back; it neither waits nor raises (a closed channel drops it).
Send = Callable[[bytes], None]
# Serves a request handed over by a worker; its outcome goes to the relay the request names.
Handle = Callable[[dict[str, Any]], Awaitable[None]]
# Serves a request that came down a node channel, sending its events back with ``send``.
HandleOver = Callable[[dict[str, Any], Send], Awaitable[None]]


def serve(directory: Path, held: int, first_client: int, handle: Handle, handle_over: HandleOver) -> None:
    """The request server's body: ``await handle(request)`` as a task per request handed over by a worker, and
    ``await handle_over(request, send)`` per request that comes down a node channel, until no worker needs it."""
    event_loop.run(_serve(directory, held, first_client, handle, handle_over))


async def _serve(directory: Path, held: int, first_client: int, handle: Handle, handle_over: HandleOver) -> None:
    slots = asyncio.Semaphore(held)
    clients = {first_client}
    running: set[asyncio.Task[None]] = set()
    channels = _Channels(slots, running, handle_over)

    async def serve_one(request: dict[str, Any]) -> None:
        try:
            await handle(request)
        finally:
            slots.release()

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return  # a probe
            sock = writer.get_extra_info("socket")
            clients.add(struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0])
            for request in json_codec.loads(line):
                if "channel" in request:
                    channels.dial(request.pop("channel"))
                await slots.acquire()
                task = asyncio.create_task(serve_one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            writer.write(_TAKEN)
        finally:
            writer.close()

    path = directory / f"requests-{held}.sock"
    # Every worker of the node may hand over at once, each a group of requests on one line.
    server = await asyncio.start_unix_server(take, str(path), backlog=1024, limit=_LINE_LIMIT)
    own = path.stat().st_ino
    try:
        while True:
            await asyncio.sleep(_WATCH)
            clients.intersection_update([pid for pid in clients if alive(pid)])
            if not clients and not running:
                break
    finally:
        server.close()
        await channels.close()
        # A successor may already listen at the path (this one was stuck): leave its socket alone.
        try:
            if path.stat().st_ino == own:
                path.unlink()
        except FileNotFoundError:
            pass


class _Channels:
    """The node channels this server dialled (see ``gateway.streaming.channels``): one WebSocket per channel id, over
    which the gateway sends requests and this server sends their events back, with no Parsl task per request.

    A request handed over by a worker carries an invitation (the channel's URL and token) while the gateway has no
    channel of that id with room; the server dials once per invitation unless it is connected already. A channel
    that cannot connect (no ``websockets`` on the node, a proxy that refuses WebSocket) costs nothing: requests keep
    coming through the workers.
    """

    def __init__(self, slots: asyncio.Semaphore, running: set[asyncio.Task[None]], handle_over: HandleOver) -> None:
        self._slots = slots
        self._running = running
        self._handle_over = handle_over
        self._dialled: dict[str, asyncio.Task[None]] = {}

    def dial(self, invitation: dict[str, str]) -> None:
        if invitation["id"] not in self._dialled:
            task = asyncio.create_task(self._hold(invitation))
            self._dialled[invitation["id"]] = task
            task.add_done_callback(lambda _: self._dialled.pop(invitation["id"], None))

    async def close(self) -> None:
        for task in list(self._dialled.values()):
            task.cancel()
        await asyncio.gather(*self._dialled.values(), return_exceptions=True)

    async def _hold(self, invitation: dict[str, str]) -> None:
        try:
            from websockets.asyncio.client import connect
            from websockets.exceptions import WebSocketException
        except ImportError:
            return
        serving: dict[str, asyncio.Task[None]] = {}
        outbox: _Outbox | None = None
        try:
            async with connect(
                invitation["url"],
                additional_headers={"authorization": f"Bearer {invitation['token']}"},
                # Tokens compress poorly and cost CPU to compress; answers can be large (embeddings).
                compression=None,
                max_size=_LINE_LIMIT,
                open_timeout=_START_TIMEOUT,
            ) as channel:
                # The log says which way requests come, for whoever wonders why Parsl is quiet.
                print(f"node channel {invitation['id']}: connected", file=sys.stderr, flush=True)
                outbox = _Outbox(channel.send)
                async for message in channel:
                    request = json_codec.loads(message)
                    if "cancel" in request:
                        # Nobody waits for the answer: cancelling the task closes the model server's request.
                        task = serving.pop(request["cancel"], None)
                        if task is not None:
                            task.cancel()
                        continue
                    stream_id = request["stream"]["id"]
                    task = asyncio.create_task(self._serve_one(request, outbox.sender(stream_id)))
                    serving[stream_id] = task
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                    task.add_done_callback(functools.partial(_forget, serving, stream_id))
        except (OSError, TimeoutError, WebSocketException) as exc:
            print(f"node channel {invitation['id']}: {exc.__class__.__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            # The gateway is gone or the channel broke: nobody can receive these answers any more.
            for task in serving.values():
                task.cancel()
            if outbox is not None:
                outbox.close()

    async def _serve_one(self, request: dict[str, Any], send: Send) -> None:
        async with self._slots:
            await self._handle_over(request, send)


class _Outbox:
    """What the requests of one channel send back, gathered per turn of the event loop into one message.

    The model server emits the next token of all its sequences together; one WebSocket message per turn, a JSON
    array of ``[stream id, text]``, costs both ends one frame for them all instead of one each. The text is the
    model server's event stream decoded as the SSE standard says (UTF-8, errors replaced), incrementally, so that a
    character split between two reads stays whole.
    """

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send
        self._pieces: list[tuple[str, str]] = []
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    def sender(self, stream_id: str) -> Send:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")

        def send(piece: bytes) -> None:
            if self._task.done():
                return  # the channel closed: its requests are being cancelled
            text = decoder.decode(piece)
            if text:
                self._pieces.append((stream_id, text))
                self._ready.set()

        return send

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            pieces, self._pieces = self._pieces, []
            await self._send(json_codec.dumps(pieces))

    def close(self) -> None:
        if self._task.done() and not self._task.cancelled():
            self._task.exception()  # the channel's own failure, already reported by its reader
        self._task.cancel()


def _forget(serving: dict[str, asyncio.Task[None]], stream_id: str, task: asyncio.Task[None]) -> None:
    if serving.get(stream_id) is task:
        del serving[stream_id]
