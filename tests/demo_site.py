"""A whole HPC site on this machine, for anyone to try: ``make demo-site`` (or ``python -m tests.demo_site``).

It starts, in this order: the local Globus Compute service (``tests/globus_compute_service.py``) with RabbitMQ
queues of its own; a single-node Slurm cluster (``tests/slurm/cluster.py``); one Globus Compute endpoint
daemon from the ``slurm-cpu`` template on that cluster, with the gateway's compute functions registered and allowed
(``tests/compute_endpoint.py``, as docs/operator-guide.md says); and ``inference-gateway serve`` with a registry of
two clusters serving the same model with the simulator: ``slurm-globus`` (transport ``globus``, through that
endpoint) and ``slurm-parsl`` (transport ``parsl``, ``provider: slurm``). Both submit their workers' block with
``sbatch`` on the first request. It prints the ``curl`` line to try, then waits.

Ctrl-C (SIGINT) or SIGTERM stops everything it started, in reverse: the gateway (which cancels the parsl block),
the endpoint daemon (whose user endpoint cancels its block), the model servers the workers launched, the Slurm
cluster (any job left is cancelled, then its daemons stop and its folder goes), the service with its queues.

``--use-running-service`` uses a local Globus Compute service that already runs on this machine (port 5000 takes one
at a time), such as a test session's, instead of starting one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from gateway.simulator import command as simulator_command
from tests.compute_endpoint import ComputeSite, EndpointDaemon, credentials
from tests.globus_compute_service import PORT, ComputeService, PortTaken
from tests.slurm.cluster import SlurmCluster
from tests.support import MODEL, TOKEN, gateway, stop_model_servers

GLOBUS_CLUSTER = "slurm-globus"
PARSL_CLUSTER = "slurm-parsl"
QUESTION = "Explain the concept of Globus Compute in simple terms."


def parsl_endpoint(cluster: SlurmCluster, state_dir: Path) -> dict[str, Any]:
    """The ``parsl`` cluster: the gateway submits its block to ``cluster`` with ``sbatch`` on the first request."""
    return {
        "cluster": PARSL_CLUSTER,
        "framework": "vllm",
        "models": [MODEL],
        "transport": "parsl",
        "parsl": {
            "provider": "slurm",
            # One core, the node shared: the globus cluster's block (one core too) runs beside it on a small machine.
            "provider_options": {
                "partition": cluster.partition,
                "walltime": "01:00:00",
                "cmd_timeout": 30,
                "exclusive": False,
                "cores_per_node": 1,
            },
            "launcher": "srun",
            "worker_init": f"export PATH={Path(sys.executable).parent}:$PATH",
            "max_workers_per_node": 4,
            "init_blocks": 0,
            "min_blocks": 0,
            "max_blocks": 1,
        },
        "worker_model_server": {
            "command": simulator_command(MODEL),
            "state_dir": str(state_dir),
            "startup_timeout": 60,
        },
    }


def curl_line(port: int, model: str = MODEL) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 30})
    return (
        f"curl -s http://127.0.0.1:{port}/resource_server/v1/chat/completions "
        f"-H {shlex.quote(f'Authorization: Bearer {TOKEN}')} -H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def local_service(stop: threading.Event) -> ComputeService | None:
    """The local Globus Compute service, once port 5000 is free (a test run may hold it); None if stopped first."""
    waiting = False
    while not stop.is_set():
        try:
            return ComputeService()
        except PortTaken as exc:
            if not waiting:
                print(f"{exc}\nwaiting until port {PORT} is free (Ctrl-C gives up)...", flush=True)
                waiting = True
        stop.wait(1)
    return None


def run(stop: threading.Event, *, use_running_service: bool = False) -> None:
    """Start the site, print how to use it, wait for ``stop``, then stop everything started."""
    root = Path(tempfile.mkdtemp(prefix="inference-gateway-demo-"))
    # munged refuses a socket below a folder that others cannot traverse.
    root.chmod(0o755)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        print(f"demo folder: {root}", flush=True)
        if not use_running_service:
            found = local_service(stop)
            if found is None:
                return
            service = stack.enter_context(found)
            print(f"RabbitMQ: virtual host {service.vhost}, queues and exchanges {service.prefix}*", flush=True)
        print(f"local Globus Compute service: http://localhost:{PORT}", flush=True)

        cluster = SlurmCluster(root / "slurm")
        stack.callback(cluster.stop)
        cluster.start()
        print(f"Slurm cluster: SLURM_CONF={cluster.conf}  (try: SLURM_CONF={cluster.conf} squeue)", flush=True)

        slurm_conf = str(cluster.conf)
        globus_state = root / "globus-node"
        parsl_state = root / "parsl-node"
        stack.callback(stop_model_servers, parsl_state)
        stack.callback(stop_model_servers, globus_state)
        daemon = EndpointDaemon(
            "demo-slurm",
            root / "endpoint",
            {**ComputeService.env(), "SLURM_CONF": slurm_conf},
            site="slurm-cpu",
            values={"CHANGE-ME-cpu-partition": cluster.partition},
            environment={"SLURM_CONF": slurm_conf},
        )
        stack.callback(daemon.stop)
        site = ComputeSite(daemon, GLOBUS_CLUSTER, MODEL, simulator_command(MODEL), globus_state).set_up()
        print(f"Globus Compute endpoint {site.endpoint_id} (template slurm-cpu), log: {daemon.log_path}", flush=True)

        config = {
            "server": {"request_timeout": 120},
            "auth": {"providers": ["dev"]},
            # The first request starts a block in Slurm and waits for it rather than getting a 503.
            "federation": {"status_interval": 2, "when_not_hot": "hold"},
            "endpoints": [site.endpoint(), parsl_endpoint(cluster, parsl_state)],
        }
        env = {**ComputeService.env(), **credentials(), "SLURM_CONF": slurm_conf}
        front = stack.enter_context(gateway(config, root, env=env, log_level="info"))
        print(f"gateway: http://127.0.0.1:{front.port} (config {root}, log {front.log_path})", flush=True)
        print(
            f"two clusters serve {MODEL}: {GLOBUS_CLUSTER} (globus) and {PARSL_CLUSTER} (parsl); "
            f"name one with /resource_server/{GLOBUS_CLUSTER}/vllm/v1 or /resource_server/{PARSL_CLUSTER}/vllm/v1",
            flush=True,
        )
        print("the first request waits for a Slurm block to start (some 20 s); try:", flush=True)
        print(curl_line(front.port), flush=True)
        print("Ctrl-C stops everything.", flush=True)
        stop.wait()
        print("stopping...", flush=True)
    print("stopped: no daemon, job or RabbitMQ queue of the demo is left.", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--use-running-service", action="store_true", help="do not start the local service")
    options = parser.parse_args(argv)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    # Set up as the first thing: a Ctrl-C while the site starts lets the started parts stop in order.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    run(stop, use_running_service=options.use_running_service)
    return 0


if __name__ == "__main__":
    sys.exit(main())
