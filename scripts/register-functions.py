"""Register the compute functions with Globus Compute: `python scripts/register-functions.py --config FILE`.

The same as `inference-gateway register-functions`; see docs/operator-guide.md.
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds the `gateway` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.cli import main

if __name__ == "__main__":
    sys.exit(main(["register-functions", *sys.argv[1:]]))
