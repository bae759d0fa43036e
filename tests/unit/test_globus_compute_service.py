"""The local Globus Compute service's protocol pieces, driven by the real SDK and read back from RabbitMQ.

No endpoint daemon here: the test plays the endpoint's side of the broker with
pika and the packages' own message classes, as the daemon would.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pika
import pytest
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import EPStatusReport, Result, Task
from globus_compute_sdk import Client

from tests.compute_endpoint import CLIENT_ID
from tests.globus_compute_service import URL, Broker, ComputeService, PortTaken

COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"


def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture
def client(compute_env: dict[str, str]) -> Client:
    return Client()


@pytest.fixture
def channel(compute_service: ComputeService) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(compute_service.amqp_url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def take(channel: Any, queue: str, timeout: float = 10) -> tuple[Any, bytes]:
    """The next message of ``queue``: its properties and body."""
    deadline = time.monotonic() + timeout
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return properties, body
        assert time.monotonic() < deadline, f"nothing arrived in {queue}"
        time.sleep(0.05)


def registered_endpoint(client: Client) -> dict[str, Any]:
    answer: dict[str, Any] = client.register_endpoint("unit", endpoint_id=None, multi_user=True)
    return answer


def test_client_credentials_get_one_token_per_resource_server(compute_service: ComputeService) -> None:
    basic = base64.b64encode(f"{CLIENT_ID}:secret".encode()).decode()
    answer = httpx.post(
        f"{URL}/v2/oauth2/token",
        data={"grant_type": "client_credentials", "scope": f"openid {COMPUTE_SCOPE}"},
        headers={"authorization": f"Basic {basic}"},
    ).json()

    tokens = {token["resource_server"]: token for token in [answer, *answer["other_tokens"]]}
    assert tokens["auth.globus.org"]["scope"] == "openid"
    assert tokens["funcx_service"]["scope"] == COMPUTE_SCOPE
    userinfo = httpx.get(
        f"{URL}/v2/oauth2/userinfo", headers={"authorization": f"Bearer {tokens['auth.globus.org']['access_token']}"}
    ).json()
    assert userinfo["identity_set"] == [{"sub": CLIENT_ID}]


def test_requests_without_a_token_are_refused(compute_service: ComputeService) -> None:
    assert httpx.get(f"{URL}/v2/version").status_code == 401


def test_registering_an_endpoint_declares_its_command_queue(
    client: Client, channel: Any, compute_service: ComputeService
) -> None:
    answer = registered_endpoint(client)

    assert channel.queue_declare(answer["command_queue_info"]["queue"], passive=True)
    heartbeats = answer["heartbeat_queue_info"]
    assert heartbeats["queue_publish_kwargs"]["exchange"] == heartbeats["exchange"] == compute_service.heartbeats


def test_a_submission_starts_the_user_endpoint_and_queues_the_task_with_the_functions_code(
    client: Client, channel: Any, compute_service: ComputeService
) -> None:
    endpoint = registered_endpoint(client)
    function_id = client.register_function(add)
    batch = client.create_batch()
    batch.add(function_id, args=(1, 2))

    submitted = client.batch_run(endpoint["endpoint_id"], batch)

    properties, body = take(channel, endpoint["command_queue_info"]["queue"])
    command = json.loads(body)
    assert properties.content_type == "application/json" and abs(properties.timestamp - time.time()) < 10
    assert command["command"] == "cmd_start_endpoint"
    assert command["globus_identity_set"] == [{"sub": CLIENT_ID}]
    credentials = command["kwargs"]["amqp_creds"]
    assert credentials["endpoint_id"] == submitted["endpoint_id"]
    # The SDK's runtime is not passed on: the endpoint's default template would install packages for it.
    assert "user_runtime" not in command["kwargs"]

    properties, body = take(channel, credentials["task_queue_info"]["queue"])
    task = messagepack.unpack(body)
    (task_id,) = submitted["tasks"][function_id]
    assert isinstance(task, Task) and str(task.task_id) == task_id
    assert properties.headers == {"function_uuid": function_id, "task_uuid": task_id}
    assert task.task_buffer == compute_service.functions[function_id] + batch.prepare()["tasks"][function_id][0]


def test_a_result_is_relayed_to_the_task_groups_queue_and_kept_for_the_task_route(
    client: Client, channel: Any, compute_service: ComputeService
) -> None:
    endpoint = registered_endpoint(client)
    function_id = client.register_function(add)
    batch = client.create_batch(create_websocket_queue=True)  # as the Executor asks
    batch.add(function_id, args=(1, 2))
    submitted = client.batch_run(endpoint["endpoint_id"], batch)
    (task_id,) = submitted["tasks"][function_id]
    packed = messagepack.pack(Result(task_id=uuid.UUID(task_id), data="serialized result"))

    channel.basic_publish(compute_service.results, compute_service.results, packed)

    properties, body = take(channel, f"{compute_service.queue_prefix}{submitted['task_group_id']}")
    assert body == packed and properties.timestamp
    deadline = time.monotonic() + 10
    while (task := client._compute_web_client.v2.get_task(task_id).data)["pending"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert task["status"] == "success" and task["result"] == "serialized result"


def test_heartbeats_answer_the_status_route(client: Client, channel: Any, compute_service: ComputeService) -> None:
    endpoint_id = registered_endpoint(client)["endpoint_id"]
    assert client.get_endpoint_status(endpoint_id)["status"] == "offline"

    report = EPStatusReport(endpoint_id=uuid.UUID(endpoint_id), global_state={"heartbeat_period": 5}, task_statuses={})
    channel.basic_publish(compute_service.heartbeats, compute_service.heartbeats, messagepack.pack(report))

    deadline = time.monotonic() + 10
    while client.get_endpoint_status(endpoint_id)["status"] != "online":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_second_service_on_the_machine_says_another_service_holds_the_port(compute_service: ComputeService) -> None:
    with pytest.raises(PortTaken, match="holds port 5000"):
        ComputeService()


def test_every_amqp_name_starts_with_the_services_prefix(client: Client, compute_service: ComputeService) -> None:
    endpoint = registered_endpoint(client)
    function_id = client.register_function(add)
    batch = client.create_batch(create_websocket_queue=True)
    batch.add(function_id, args=(1, 2))
    client.batch_run(endpoint["endpoint_id"], batch)

    command = compute_service.commands[-1]["kwargs"]["amqp_creds"]
    names = [
        endpoint["command_queue_info"]["queue"],
        endpoint["heartbeat_queue_info"]["exchange"],
        command["task_queue_info"]["queue"],
        command["result_queue_info"]["exchange"],
        compute_service.queue_prefix,
    ]
    assert all(name.startswith(compute_service.prefix) for name in names), names


def test_the_broker_deletes_what_it_declared_when_it_stops(compute_service: ComputeService, channel: Any) -> None:
    prefix = f"{compute_service.prefix}broker-test."
    broker = Broker(compute_service.amqp_url)
    broker.start({f"{prefix}results": lambda properties, body: None})
    broker.declare_queue(f"{prefix}tasks")

    broker.stop()

    for name in [f"{prefix}results", f"{prefix}tasks"]:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
            channel.connection.channel().queue_declare(name, passive=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        channel.connection.channel().exchange_declare(f"{prefix}results", passive=True)
