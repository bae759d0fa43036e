"""Benchmark an OpenAI-compatible server: `python scripts/benchmark-serving.py --help`."""

import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds the `gateway` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
