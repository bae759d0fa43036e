"""``python -m gateway.simulator``: serve synthetic answers on vLLM's OpenAI-compatible routes."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

import uvicorn

from gateway.simulator.apis import create_app
from gateway.simulator.server import SimulatorSettings


def parse_args(argv: Sequence[str] | None = None) -> SimulatorSettings:
    parser = argparse.ArgumentParser(
        prog="inference-simulator",
        description="A vLLM-compatible OpenAI server that loads no model and answers with synthetic, deterministic "
        "text. Each --model gets its own --max-num-seqs slots, as if each were a separate vLLM server.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port (shown in the banner)")
    parser.add_argument(
        "--model", action="append", required=True, metavar="NAME", help="a model name to serve; repeat for several"
    )
    parser.add_argument(
        "--ttft",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="time to the first token, once the request has a slot",
    )
    parser.add_argument("--tpot", type=float, default=0.0, metavar="SECONDS", help="time per further output token")
    parser.add_argument(
        "--tpot-batch-factor",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="how much slower each token gets per other running sequence, as in a batched GPU engine (default 0)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        metavar="N",
        help="requests running at once per model; more wait in a queue",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=16,
        metavar="N",
        help="output tokens when the request sets no max_tokens",
    )
    parser.add_argument("--embedding-dim", type=int, default=16, metavar="N")
    parser.add_argument(
        "--max-model-len", type=int, default=32768, metavar="N", help="context length: prompt plus output tokens"
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )
    args = parser.parse_args(argv)
    try:
        return SimulatorSettings(
            models=tuple(dict.fromkeys(args.model)),
            host=args.host,
            port=args.port,
            ttft=args.ttft,
            tpot=args.tpot,
            tpot_batch_factor=args.tpot_batch_factor,
            max_num_seqs=args.max_num_seqs,
            default_max_tokens=args.default_max_tokens,
            embedding_dim=args.embedding_dim,
            max_model_len=args.max_model_len,
            log_level=args.log_level,
        )
    except ValueError as error:
        parser.error(str(error))


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    # A worker node may have plain uvicorn without its [standard] extras: run there too, only slower.
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if _available("uvloop") else "asyncio",
        http="httptools" if _available("httptools") else "h11",
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    sock = config.bind_socket()
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    timing = f"ttft {settings.ttft:g} s, tpot {settings.tpot:g} s, max-num-seqs {settings.max_num_seqs}"
    print(
        f"vLLM-compatible simulator (no model is loaded; answers are synthetic) serving "
        f"{', '.join(settings.models)} on http://{host}:{port} ({timing})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
