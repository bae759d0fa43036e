"""The ``inference-gateway`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.config import DEFAULT_CONFIG, ConfigError, load_config


def listen_url(host: str, port: int) -> str:
    """The URL that reaches a gateway listening on ``host``: where workers push streamed answers by default."""
    if host in ("", "0.0.0.0", "::"):
        import socket

        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_command(config: str | Path, *, log_level: str = "warning") -> list[str]:
    """``inference-gateway serve`` with ``config``, as a command line for ``ModelServer`` (which fills in the port)."""
    return [
        sys.executable, "-m", "gateway.cli", "serve", "--port", "{port}", "--config", str(config),
        "--log-level", log_level,
    ]  # fmt: skip


def _cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None; asked before anything starts, since uvicorn binds only
    after the application's startup (model servers, workers) and would announce it complete, then fail."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: a port with connections lingering in TIME_WAIT is free to reuse.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.front_door import protocol
    from gateway.observability.logs import configure_logging

    config = load_config(args.config)
    problem = _cannot_listen(args.host, args.port)
    if problem is not None:
        print(
            f"error: cannot listen on {args.host}:{args.port}: {problem}. Is another gateway running there? "
            "Stop it, or choose another port with --port.",
            file=sys.stderr,
        )
        return 1
    if config.relay.url is None:
        config.relay.url = listen_url(args.host, args.port)
    configure_logging(config.logging, args.log_level)
    options = {
        "host": args.host,
        "port": args.port,
        "loop": "uvloop",
        "http": protocol(config.server),
        # Nodes' request servers dial in over WebSocket (``gateway.streaming.channels``); answers can be large (a
        # batch of embeddings), and compressing tokens costs more CPU than it saves.
        "ws": "websockets-sansio",
        "ws_max_size": 1 << 30,
        "ws_per_message_deflate": False,
        "access_log": False,
        "log_config": None,
        "timeout_graceful_shutdown": config.server.drain_timeout,
    }
    if args.workers > 1:
        from gateway import workers

        problems = workers.unshareable(config)
        if problems:
            print(f"error: --workers {args.workers} cannot share this configuration:", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            return 2
        workers.serve(args.config, config, args.workers, args.log_level, **options)
        return 0
    uvicorn.run(create_app(config), log_level=args.log_level, **options)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    models = sorted({model for endpoint in config.endpoints for model in endpoint.models})
    print(f"{args.file}: OK ({len(config.endpoints)} endpoints, {len(models)} models)")
    return 0


def _dev_token(args: argparse.Namespace) -> int:
    from gateway.auth.dev import dev_token

    config = load_config(args.config)
    print(dev_token(config.state_dir(), config.auth.dev.token_env, create=True))
    return 0


def _register_functions(args: argparse.Namespace) -> int:
    from gateway.dispatch.globus import sdk_client
    from gateway.dispatch.registration import globus_endpoints, register_into_file

    # Before the Globus Compute client: making one starts a Globus login, pointless when there is nothing to update.
    try:
        text = Path(args.config).read_text()
    except OSError as exc:
        raise ConfigError(f"{args.config}: cannot read: {exc.strerror or exc}") from None
    globus_endpoints(text, args.config, args.endpoint)
    try:
        register_into_file(Path(args.config), sdk_client(), args.endpoint)
    except ConfigError:
        raise
    except Exception as exc:
        print(f"error: Globus Compute refused the registration: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _usage(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.accounting.report import as_csv, as_table, parse_day, parse_dimensions
    from gateway.storage.database import Database, DatabaseUnavailable

    config = load_config(args.config)
    try:
        by = parse_dimensions(args.by)
        since = parse_day(args.since) if args.since else None
        until = parse_day(args.until) if args.until else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    database = Database(config.database.resolved_url(config.state_dir()), timeout=config.database.timeout)

    async def report() -> list[dict[str, object]]:
        try:
            return await database.usage_report(by, since, until)
        finally:
            await database.close()

    try:
        rows = asyncio.run(report())
    except DatabaseUnavailable as exc:
        print(f"error: cannot read the usage log at {database.url!r}: {exc}", file=sys.stderr)
        return 1
    print((as_csv if args.format == "csv" else as_table)(rows, by), end="")
    return 0


def _maintenance(args: argparse.Namespace) -> int:
    from gateway.federation.tracker import MAINTENANCE_FILE, read_maintenance, write_maintenance

    config = load_config(args.config)
    clusters = {endpoint.cluster for endpoint in config.endpoints}
    path = config.state_dir() / MAINTENANCE_FILE
    current = read_maintenance(path)
    if args.cluster is not None:
        if args.cluster not in clusters:
            print(
                f"error: no endpoint is on cluster '{args.cluster}' (known: {', '.join(sorted(clusters))})",
                file=sys.stderr,
            )
            return 2
        if args.off:
            current.pop(args.cluster, None)
        else:
            current[args.cluster] = args.message
        write_maintenance(path, current)
    configured = config.federation.maintenance
    for cluster in sorted(clusters):
        message = current.get(cluster, configured.get(cluster))
        print(f"{cluster}: {'maintenance: ' + message if message is not None else 'in service'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inference-gateway", description="OpenAI-compatible inference gateway.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--config", default=None, help=f"endpoint registry YAML (default: {DEFAULT_CONFIG})")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--workers", type=int, default=1, help="serving processes on this machine (sharing state through Redis)"
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    token = commands.add_parser("dev-token", help="print the dev bearer token (created on first use)")
    token.add_argument("--config", default=None)
    token.set_defaults(run=_dev_token)

    maintenance = commands.add_parser(
        "maintenance",
        help="put a cluster under maintenance or back in service (running gateways notice within one status "
        "interval); without a cluster, list each cluster's state",
    )
    maintenance.add_argument("cluster", nargs="?")
    maintenance.add_argument("--off", action="store_true", help="back in service")
    maintenance.add_argument("--message", default="scheduled maintenance")
    maintenance.add_argument("--config", default=None)
    maintenance.set_defaults(run=_maintenance)

    usage = commands.add_parser("usage", help="report requests and tokens from the usage log")
    usage.add_argument("--config", default=None)
    usage.add_argument("--by", default="user,model,day", help="group by any of user,model,day,cluster,endpoint")
    usage.add_argument("--since", default=None, help="from this UTC day (YYYY-MM-DD) or time on")
    usage.add_argument("--until", default=None, help="up to (not including) this UTC day or time")
    usage.add_argument("--format", default="table", choices=["table", "csv"])
    usage.set_defaults(run=_usage)

    register = commands.add_parser(
        "register-functions",
        help="register the compute functions with Globus Compute and write their ids into the registry file",
    )
    register.add_argument("--config", required=True, help="the registry YAML to update")
    register.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="CLUSTER/FRAMEWORK",
        help="update only this globus endpoint (repeatable; default: every globus endpoint)",
    )
    register.set_defaults(run=_register_functions)

    from gateway.batches.cli import add_commands

    add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
