"""The databases the accounting tests write to: the machine's PostgreSQL, and a private one they may stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from compute_functions.model_server import free_port

# The machine's server, as CI starts it: trust authentication on loopback.
SHARED_POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
POSTGRES_BIN = Path(os.environ.get("TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))


def asyncpg_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


async def _admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextmanager
def scratch_database() -> Iterator[str]:
    """A database of its own on the machine's PostgreSQL, dropped afterwards; yields its URL."""
    name = f"gateway_test_{os.urandom(5).hex()}"
    asyncio.run(_admin(SHARED_POSTGRES, f'CREATE DATABASE "{name}"'))
    try:
        yield SHARED_POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(_admin(SHARED_POSTGRES, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def database_settings(kind: str) -> Iterator[dict[str, Any]]:
    """The gateway's ``database`` settings for ``kind``: ``sqlite``, its own file in the state folder (the default),
    or ``postgresql``, a scratch database on the machine's PostgreSQL."""
    if kind == "sqlite":
        yield {}
        return
    with scratch_database() as url:
        yield {"url": asyncpg_url(url)}


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of the test's own, in a temporary directory, that the test may stop and start."""

    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        # PostgreSQL refuses to run as root; the tests may be root (CI is).
        user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*user, str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.directory / "data"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(self.directory / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    directory = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [
            *user,
            str(POSTGRES_BIN / "initdb"),
            "-D",
            str(directory / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-N",
            "--no-instructions",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = PrivatePostgres(directory, free_port())
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


class StuckDatabase:
    """A TCP listener in front of a database: it forwards connections, or, while ``hang()`` holds, accepts them
    and passes no byte either way, as a database server that is stuck does (the connections already open stall
    too). ``flow()`` lets the bytes through again; ``delay`` slows each piece down."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        # Seconds each piece waits before it is passed on: a slow database rather than a stuck one.
        self.delay = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        """``database_url`` (on the upstream server) reached through this listener."""
        return database_url.replace(f":{self.upstream_port}/", f":{self.port}/", 1)

    def hang(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._flowing.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        self._sockets.append(upstream)
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        self._pump(upstream, client)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                time.sleep(self.delay)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._listener.close()
        for connection in self._sockets:
            with contextlib.suppress(OSError):
                connection.close()
