#!/usr/bin/env python3
"""Globus login and access tokens for the inference gateway; needs only ``globus-sdk``.

    python scripts/inference-auth-token.py authenticate
    export MY_TOKEN=$(python scripts/inference-auth-token.py get_access_token)

The same command is installed as ``inference-auth-token``; see docs/authentication.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.auth.token_cli import main

if __name__ == "__main__":
    sys.exit(main())
