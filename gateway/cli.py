"""The ``inference-gateway`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from gateway.config import DEFAULT_CONFIG, ConfigError, load_config


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    config = load_config(args.config)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inference-gateway", description="OpenAI-compatible inference gateway.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--config", default=None, help=f"endpoint registry YAML (default: {DEFAULT_CONFIG})")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    token = commands.add_parser("dev-token", help="print the dev bearer token (created on first use)")
    token.add_argument("--config", default=None)
    token.set_defaults(run=_dev_token)
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
