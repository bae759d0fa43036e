"""A local stand-in for the Globus Compute web service, for the unmodified SDK and endpoint daemon.

The HTTP side listens on ``http://localhost:5000``, the address that both the
SDK's ``local`` environment (``GLOBUS_SDK_ENVIRONMENT=local``) and an endpoint
with ``local_compute_services: true`` use; the port is fixed by the SDK, so one
service runs on a machine at a time: a second one (another test run, the demo) waits
for the first to stop, on a lock file beside the machine's other temporary files,
for at most ``wait`` seconds. It answers:

- the two Globus Auth routes the endpoint daemon and the SDK's client login need
  (``POST /v2/oauth2/token`` for client credentials, ``GET /v2/oauth2/userinfo``),
  with ``GLOBUS_SDK_SERVICE_URL_AUTH`` pointing globus-sdk here;
- the Compute routes: ``GET /v2/version``, ``POST /v3/functions``,
  ``POST|PUT /v3/endpoints``, ``POST /v3/endpoints/{id}/submit``,
  ``GET /v2/get_amqp_result_connection_url``, ``GET /v2/endpoints/{id}/status``,
  ``GET /v2/tasks/{id}``.

The AMQP side runs through a RabbitMQ broker: the service declares every exchange
and queue, as the real one does, and the clients only consume and publish. Each
service names them with a prefix of its own (``compute-test-<random>.``) and deletes
them when it stops, so that runs share a virtual host without meeting and the broker
account needs no administrator's rights: the default virtual host ``/``, or the one
``INFERENCE_GATEWAY_COMPUTE_VHOST`` names (made beforehand by whoever administers the
broker). The clients learn every name from the service's answers; the SDK's
task-group queues take the prefix through ``queue_prefix``. A submission sends ``cmd_start_endpoint`` to the
core endpoint's command queue (it starts the user endpoint, or refreshes the
credentials of a running one) and each task, packed with the registered function's
code, to the user endpoint's task queue. Results the endpoint publishes are
republished, byte for byte, to the SDK's task-group queue; heartbeats are kept and
answer the status route.

It does not enforce ``allowed_functions`` at submission, as the real service also
does: the endpoint's own check is what the tests exercise.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import pika
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import EPStatusReport, Result, Task

# Fixed by the SDK's ``local`` environment (globus_compute_sdk/sdk/_environments.py).
PORT = 5000
URL = f"http://localhost:{PORT}"
# The broker's virtual host the service runs in, when not the default one.
VHOST_VARIABLE = "INFERENCE_GATEWAY_COMPUTE_VHOST"
# The command that controls the broker (``rabbitmqctl`` by default): only the tests that have it close connections.
RABBITMQCTL_VARIABLE = "INFERENCE_GATEWAY_RABBITMQCTL"
# What the service needs in a user endpoint's heartbeat to call it online.
_HEARTBEAT_SLACK = 2.5

# Scopes of Globus Auth itself; any other scope asked for is the Compute service's.
_AUTH_SCOPES = {"openid", "profile", "email"}
_AUTH_URN = "urn:globus:auth:scope:auth.globus.org:"

# Held by the service that has the port; every account on the machine can open it.
LOCK_FILE = "/tmp/inference-gateway-compute-service.lock"

T = TypeVar("T")


def take_port_lock(wait: float) -> int:
    """A descriptor holding the machine's lock on the service's port, after waiting at most ``wait`` seconds."""
    umask = os.umask(0)
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    finally:
        os.umask(umask)
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if wait and not told:
                told = True
                print(f"waiting for another local Globus Compute service to free port {PORT}", file=sys.stderr)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise PortTaken(
                    f"another local Globus Compute service holds port {PORT} (lock {LOCK_FILE}); "
                    "stop it (its test run or demo) and try again"
                ) from None
            time.sleep(0.5)


class PortTaken(RuntimeError):
    """Another service (or anything else) already listens on the fixed port."""


@dataclass
class Caller:
    """Whom a bearer token stands for: a client identity logged in with client credentials."""

    client_id: str

    @property
    def identity(self) -> dict[str, str]:
        return {"sub": self.client_id}


@dataclass
class CoreEndpoint:
    """A registered endpoint daemon: its command queue and the user endpoints it started."""

    endpoint_id: str
    name: str
    owner: Caller
    allowed_functions: list[str] | None
    command_queue: str
    heartbeat: EPStatusReport | None = None
    heard_at: float = 0.0
    user_endpoints: set[str] = field(default_factory=set)


@dataclass
class UserEndpoint:
    """A user endpoint: what a core endpoint forks for one identity and one set of template values."""

    endpoint_id: str
    core: str
    task_queue: str
    heartbeat: EPStatusReport | None = None
    heard_at: float = 0.0


@dataclass
class TaskRecord:
    task_id: str
    task_group_id: str
    function_id: str
    endpoint_id: str
    result: Result | None = None


class Broker:
    """The service's one AMQP connection, owned by one thread (pika's connections are not thread-safe).

    It deletes every exchange and queue it declared when it stops.
    """

    def __init__(self, url: str) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        self._channel = self._connection.channel()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="compute-service-amqp", daemon=True)
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()

    def start(self, consumers: dict[str, Callable[[pika.BasicProperties, bytes], None]]) -> None:
        for name, handler in consumers.items():
            self._channel.exchange_declare(name, exchange_type="direct")
            self._exchanges.add(name)
            self._declare(self._channel, name)
            self._channel.queue_bind(name, name, routing_key=name)
            self._channel.basic_consume(name, _acking(handler), auto_ack=False)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self._connection.process_data_events(time_limit=0.2)

    def declare_queue(self, name: str) -> None:
        self.call(lambda channel: self._declare(channel, name))

    def _declare(self, channel: pika.adapters.blocking_connection.BlockingChannel, name: str) -> None:
        channel.queue_declare(name)
        self._queues.add(name)

    def call(self, work: Callable[[pika.adapters.blocking_connection.BlockingChannel], T]) -> T:
        """Run ``work`` with the channel on the broker's thread and return what it returns."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(work(self._channel))
            except BaseException as exc:  # handed to the caller's thread
                done.set_exception(exc)

        if threading.current_thread() is self._thread:
            run()
        else:
            self._connection.add_callback_threadsafe(run)
        return done.result(timeout=10)

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5)
        try:
            for queue in self._queues:
                self._channel.queue_delete(queue)
            for exchange in self._exchanges:
                self._channel.exchange_delete(exchange)
        finally:
            self._connection.close()


def _acking(handler: Callable[[pika.BasicProperties, bytes], None]) -> Callable[..., None]:
    def on_message(channel: Any, deliver: Any, properties: pika.BasicProperties, body: bytes) -> None:
        try:
            handler(properties, body)
        finally:
            channel.basic_ack(deliver.delivery_tag)

    return on_message


def _rabbitmqctl(*args: str) -> str:
    command = [*shlex.split(os.environ.get(RABBITMQCTL_VARIABLE) or "rabbitmqctl"), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RuntimeError(f"{command[0]} is not found (PATH={os.environ.get('PATH', '')})") from None
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


class BrokerControlUnavailable(RuntimeError):
    """``rabbitmqctl`` cannot control the broker from this account; the message says what it takes."""


def broker_control() -> None:
    """Raise ``BrokerControlUnavailable`` at once when ``rabbitmqctl`` cannot control the broker from this account.

    Nothing in AMQP lets a client close another client's connection: that takes the broker's own control tool.
    """
    try:
        _rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid")
    except RuntimeError as exc:
        raise BrokerControlUnavailable(
            f"{exc}\nClosing a client's connection from the broker needs rabbitmqctl: run as root, or give this "
            f"account the broker's Erlang cookie (~/.erlang.cookie, mode 0400) and set {RABBITMQCTL_VARIABLE}="
            "/usr/lib/rabbitmq/bin/rabbitmqctl (Debian's /usr/sbin/rabbitmqctl works for root and rabbitmq only)"
        ) from None


def close_connections(vhost: str, peer_ports: set[int]) -> int:
    """Have the broker close the connections of ``vhost`` that come from ``peer_ports``; how many it closed."""
    closed = 0
    listing = _rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "vhost", "peer_port")
    for line in listing.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1] == vhost and int(parts[2]) in peer_ports:
            _rabbitmqctl("close_connection", parts[0], "closed by the test")
            closed += 1
    return closed


class ComputeService:
    """The Globus Compute web service on ``localhost:5000`` over RabbitMQ; see the module docstring.

    ``vhost`` defaults to ``INFERENCE_GATEWAY_COMPUTE_VHOST``, else ``/``; ``prefix`` starts every AMQP name.
    """

    def __init__(
        self,
        *,
        vhost: str | None = None,
        prefix: str | None = None,
        amqp_host: str = "127.0.0.1",
        amqp_port: int = 5672,
        amqp_user: str = "guest",
        wait: float = 0.0,
        port_lock: int | None = None,
    ) -> None:
        """``port_lock``: the machine's lock on the port, taken already (``take_port_lock``); the service releases it
        when it stops. Without it, the service takes it, waiting at most ``wait`` seconds."""
        self.vhost = vhost or os.environ.get(VHOST_VARIABLE) or "/"
        self.prefix = prefix or f"compute-test-{secrets.token_hex(4)}."
        self.amqp_url = f"amqp://{amqp_user}:{amqp_user}@{amqp_host}:{amqp_port}/{quote(self.vhost, safe='')}"
        # The exchanges and queues the endpoints publish their results and heartbeats to.
        self.results = f"{self.prefix}results"
        self.heartbeats = f"{self.prefix}heartbeats"
        self.queue_prefix = f"{self.results}."
        self.functions: dict[str, str] = {}
        self.endpoints: dict[str, CoreEndpoint] = {}
        self.user_endpoints: dict[str, UserEndpoint] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.commands: list[dict[str, Any]] = []
        self._tokens: dict[str, Caller] = {}
        self._lock = threading.Lock()
        self._broker: Broker | None = None
        self._port_lock = take_port_lock(wait) if port_lock is None else port_lock
        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", PORT), _handler(self))
        except OSError as exc:
            os.close(self._port_lock)
            raise PortTaken(
                f"port {PORT} is taken ({exc.strerror}): the SDK's local environment needs it; another "
                "Globus Compute service (or other server) runs on this machine"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="compute-service-http", daemon=True)

    def start(self) -> ComputeService:
        self._broker = Broker(self.amqp_url)
        self._broker.start({self.results: self._on_result, self.heartbeats: self._on_heartbeat})
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering, delete the service's exchanges and queues, and free the port."""
        self._server.shutdown()
        self._server.server_close()
        if self._broker is not None:
            self._broker.stop()
        os.close(self._port_lock)

    def __enter__(self) -> ComputeService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def env() -> dict[str, str]:
        """What points the SDK (and globus-sdk's login) at this service."""
        return {"GLOBUS_SDK_ENVIRONMENT": "local", "GLOBUS_SDK_SERVICE_URL_AUTH": f"{URL}/"}

    # --- what the tests look at -----------------------------------------------------------------------------------

    def online(self, endpoint_id: str) -> bool:
        return self.status(endpoint_id)["status"] == "online"

    def status(self, endpoint_id: str) -> dict[str, Any]:
        """The status report of an endpoint: the core's heartbeat, with the details of a live user endpoint.

        A user endpoint that stopped (idle, or its daemon died) sends a last
        heartbeat with ``active: false`` or falls silent; its details are then gone.
        """
        with self._lock:
            core = self.endpoints.get(endpoint_id)
            if core is None or not _fresh(core.heartbeat, core.heard_at):
                return {"status": "offline", "details": {}}
            live = [
                user
                for user in (self.user_endpoints[name] for name in core.user_endpoints)
                if _fresh(user.heartbeat, user.heard_at) and user.heartbeat.global_state.get("active", True)
            ]
        if not live:
            return {"status": "online", "details": {}}
        newest = max(live, key=lambda user: user.heard_at)
        assert newest.heartbeat is not None
        return {"status": "online", "details": dict(newest.heartbeat.global_state)}

    # --- HTTP ------------------------------------------------------------------------------------------------------

    def answer(self, method: str, path: str, body: dict[str, Any], form: dict[str, str], auth: str) -> Any:
        """(status, body) for one request; runs on the server's threads."""
        if (method, path) == ("POST", "/v2/oauth2/token"):
            return self._token(form, auth)
        caller = self._tokens.get(auth.removeprefix("Bearer "))
        if caller is None:
            return 401, {"code": "AUTHENTICATION_ERROR", "message": "no valid bearer token"}
        parts = path.strip("/").split("/")
        if (method, path) == ("GET", "/v2/oauth2/userinfo"):
            return 200, {"sub": caller.client_id, "identity_set": [caller.identity]}
        if (method, path) == ("GET", "/v2/version"):
            return 200, {"api": "1.0", "min_sdk_version": "2.0.0", "min_ep_version": "2.0.0"}
        if (method, path) == ("POST", "/v3/functions"):
            return self._register_function(body)
        if (method, path) == ("POST", "/v3/endpoints"):
            return self._register_endpoint(str(body.get("endpoint_id") or uuid.uuid4()), body, caller)
        if method == "PUT" and parts[:2] == ["v3", "endpoints"] and len(parts) == 3:
            return self._register_endpoint(parts[2], body, caller)
        if method == "POST" and parts[:2] == ["v3", "endpoints"] and parts[3:] == ["submit"]:
            return self._submit(parts[2], body, caller)
        if (method, path) == ("GET", "/v2/get_amqp_result_connection_url"):
            return 200, {"connection_url": self.amqp_url, "queue_prefix": self.queue_prefix}
        if method == "GET" and parts[:2] == ["v2", "endpoints"] and parts[3:] == ["status"]:
            return 200, self.status(parts[2])
        if method == "GET" and parts[:2] == ["v2", "tasks"] and len(parts) == 3:
            return self._task(parts[2])
        return 404, {"code": "NOT_FOUND", "message": f"no route {method} {path}"}

    def _token(self, form: dict[str, str], auth: str) -> Any:
        # Client credentials, as globus-sdk sends them: HTTP Basic with the client id (any secret is accepted).
        if form.get("grant_type") != "client_credentials" or not auth.startswith("Basic "):
            return 400, {"error": "unsupported_grant_type"}
        client_id = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")[0]
        # One token per resource server, as Globus Auth answers a request for scopes of several.
        by_server: dict[str, list[str]] = {}
        for scope in form.get("scope", "").split():
            server = "auth.globus.org" if scope in _AUTH_SCOPES or scope.startswith(_AUTH_URN) else "funcx_service"
            by_server.setdefault(server, []).append(scope)
        tokens = []
        for server, scopes in (by_server or {"funcx_service": []}).items():
            token = secrets.token_urlsafe(24)
            with self._lock:
                self._tokens[token] = Caller(client_id)
            tokens.append(
                {
                    "access_token": token,
                    "scope": " ".join(scopes),
                    "resource_server": server,
                    "expires_in": 172_800,
                    "token_type": "Bearer",
                }
            )
        return 200, {**tokens[0], "other_tokens": tokens[1:]}

    def _register_function(self, body: dict[str, Any]) -> Any:
        code = body.get("function_code")
        if not isinstance(code, str) or not code:
            return 400, {"code": "BAD_REQUEST", "message": "function_code is required"}
        function_id = str(uuid.uuid4())
        with self._lock:
            self.functions[function_id] = code
        return 200, {"function_uuid": function_id}

    def _register_endpoint(self, endpoint_id: str, body: dict[str, Any], caller: Caller) -> Any:
        with self._lock:
            known = self.endpoints.get(endpoint_id)
            if known is not None and known.owner != caller:
                return 403, {"code": "ENDPOINT_ACCESS_FORBIDDEN", "message": "endpoint belongs to another identity"}
            allowed = body.get("allowed_functions")
            self.endpoints[endpoint_id] = core = CoreEndpoint(
                endpoint_id,
                str(body.get("endpoint_name") or body.get("name") or ""),
                caller,
                [str(function) for function in allowed] if allowed else None,
                f"{self.prefix}{endpoint_id}.command",
                user_endpoints=known.user_endpoints if known else set(),
            )
        self._declare_queue(core.command_queue)
        return 200, {
            "endpoint_id": endpoint_id,
            "command_queue_info": {"connection_url": self.amqp_url, "queue": core.command_queue},
            "heartbeat_queue_info": self._heartbeat_info(),
        }

    def _heartbeat_info(self) -> dict[str, Any]:
        return {
            "connection_url": self.amqp_url,
            "queue": self.heartbeats,
            "exchange": self.heartbeats,
            "queue_publish_kwargs": {
                "exchange": self.heartbeats,
                "routing_key": self.heartbeats,
                "mandatory": True,
                "properties": {"delivery_mode": 2},
            },
        }

    def _submit(self, endpoint_id: str, body: dict[str, Any], caller: Caller) -> Any:
        with self._lock:
            core = self.endpoints.get(endpoint_id)
        if core is None:
            return 404, {"code": "ENDPOINT_NOT_FOUND", "message": f"no endpoint {endpoint_id}"}
        if core.owner != caller:
            return 403, {"code": "ENDPOINT_ACCESS_FORBIDDEN", "message": "this identity may not use the endpoint"}
        tasks = body.get("tasks")
        if not isinstance(tasks, dict) or not tasks:
            return 400, {"code": "BAD_REQUEST", "message": "no tasks"}
        unknown = [function_id for function_id in tasks if function_id not in self.functions]
        if unknown:
            return 404, {"code": "FUNCTION_NOT_FOUND", "message": f"no function {unknown[0]}"}
        # The SDK's user_runtime is not forwarded: the endpoint's default template would then install packages.
        options = body.get("user_endpoint_config") or {}
        user = self._user_endpoint(core, caller, options)
        group = str(body.get("task_group_id") or uuid.uuid4())
        created: dict[str, list[str]] = {}
        records = []
        for function_id, payloads in tasks.items():
            for payload in payloads:
                record = TaskRecord(str(uuid.uuid4()), group, function_id, user.endpoint_id)
                records.append((record, self.functions[function_id] + payload))
                created.setdefault(function_id, []).append(record.task_id)
        with self._lock:
            self.tasks.update({record.task_id: record for record, _ in records})
        command = self._start_command(core, user, caller, options)

        def publish(channel: Any) -> None:
            if body.get("create_queue", True):
                self._declare_queue(f"{self.queue_prefix}{group}")
            channel.basic_publish(
                "",
                core.command_queue,
                json.dumps(command).encode(),
                pika.BasicProperties(content_type="application/json", timestamp=int(time.time())),
            )
            for record, buffer in records:
                headers = {"function_uuid": record.function_id, "task_uuid": record.task_id}
                if body.get("resource_specification"):
                    headers["resource_specification"] = json.dumps(body["resource_specification"])
                if body.get("result_serializers"):
                    headers["result_serializers"] = body["result_serializers"]
                packed = messagepack.pack(Task(task_id=uuid.UUID(record.task_id), task_buffer=buffer))
                channel.basic_publish("", user.task_queue, packed, pika.BasicProperties(headers=headers))

        self._call(publish)
        return 200, {
            "tasks": created,
            "task_group_id": group,
            "request_id": str(uuid.uuid4()),
            "endpoint_id": user.endpoint_id,
        }

    def _user_endpoint(self, core: CoreEndpoint, caller: Caller, options: dict[str, Any]) -> UserEndpoint:
        # One user endpoint per core endpoint, identity and template values, with a stable id.
        key = json.dumps([core.endpoint_id, caller.client_id, options], sort_keys=True)
        endpoint_id = str(uuid.uuid5(uuid.NAMESPACE_URL, key))
        with self._lock:
            user = self.user_endpoints.get(endpoint_id)
            new = user is None
            if user is None:
                user = self.user_endpoints[endpoint_id] = UserEndpoint(
                    endpoint_id, core.endpoint_id, f"{self.prefix}{endpoint_id}.tasks"
                )
            core.user_endpoints.add(endpoint_id)
        if new:
            # Outside the lock: the broker's thread takes it for every heartbeat.
            self._declare_queue(user.task_queue)
        return user

    def _start_command(
        self, core: CoreEndpoint, user: UserEndpoint, caller: Caller, options: dict[str, Any]
    ) -> dict[str, Any]:
        results = {
            "connection_url": self.amqp_url,
            "queue": self.results,
            "exchange": self.results,
            "queue_publish_kwargs": {
                "exchange": self.results,
                "routing_key": self.results,
                "mandatory": True,
                "properties": {"delivery_mode": 2},
            },
        }
        command = {
            "command": "cmd_start_endpoint",
            "globus_username": f"{caller.client_id}@clients.auth.globus.org",
            "globus_effective_identity": caller.client_id,
            "globus_identity_set": [caller.identity],
            "args": [],
            "kwargs": {
                "name": f"uep.{core.endpoint_id}.{user.endpoint_id}",
                "user_opts": options,
                "amqp_creds": {
                    "endpoint_id": user.endpoint_id,
                    "task_queue_info": {"connection_url": self.amqp_url, "queue": user.task_queue},
                    "result_queue_info": results,
                    "heartbeat_queue_info": self._heartbeat_info(),
                },
            },
        }
        with self._lock:
            self.commands.append(command)
        return command

    def _task(self, task_id: str) -> Any:
        with self._lock:
            record = self.tasks.get(task_id)
        if record is None:
            return 404, {"code": "TASK_NOT_FOUND", "message": f"no task {task_id}"}
        answer: dict[str, Any] = {"task_id": task_id, "task_group_id": record.task_group_id}
        if record.result is None:
            return 200, {**answer, "status": "waiting-for-launch", "pending": True}
        if record.result.is_error:
            return 200, {**answer, "status": "failed", "pending": False, "exception": record.result.data}
        return 200, {**answer, "status": "success", "pending": False, "result": record.result.data}

    # --- AMQP, on the broker's thread --------------------------------------------------------------------------------

    def _call(self, work: Callable[[Any], T]) -> T:
        assert self._broker is not None, "the service is not started"
        return self._broker.call(work)

    def _declare_queue(self, name: str) -> None:
        assert self._broker is not None, "the service is not started"
        self._broker.declare_queue(name)

    def _on_result(self, properties: pika.BasicProperties, body: bytes) -> None:
        result = messagepack.unpack(body)
        if not isinstance(result, Result):
            return
        with self._lock:
            record = self.tasks.get(str(result.task_id))
            if record is not None:
                record.result = result
        if record is None:
            return
        assert self._broker is not None
        self._broker.call(
            lambda channel: channel.basic_publish(
                "",
                f"{self.queue_prefix}{record.task_group_id}",
                body,
                pika.BasicProperties(timestamp=int(time.time()), content_type="application/octet-stream"),
            )
        )

    def _on_heartbeat(self, properties: pika.BasicProperties, body: bytes) -> None:
        report = messagepack.unpack(body)
        if not isinstance(report, EPStatusReport):
            return
        endpoint_id = str(report.endpoint_id)
        now = time.monotonic()
        with self._lock:
            target = self.endpoints.get(endpoint_id) or self.user_endpoints.get(endpoint_id)
            if target is not None:
                target.heartbeat, target.heard_at = report, now


def _fresh(report: EPStatusReport | None, heard_at: float) -> bool:
    if report is None or report.global_state.get("error"):
        return False
    period = float(report.global_state.get("heartbeat_period") or 30)
    return time.monotonic() - heard_at < period * _HEARTBEAT_SLACK


def _handler(service: ComputeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            body: dict[str, Any] = {}
            form: dict[str, str] = {}
            if "json" in (self.headers.get("content-type") or "") and raw:
                body = json.loads(raw)
            elif raw:
                form = {key: values[-1] for key, values in parse_qs(raw).items()}
            try:
                status, answer = service.answer(method, parts.path, body, form, self.headers.get("authorization", ""))
            except Exception as exc:  # the client sees the failure instead of a dropped connection
                status, answer = 500, {"code": "INTERNAL_ERROR", "message": f"{exc.__class__.__name__}: {exc}"}
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
