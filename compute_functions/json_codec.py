"""JSON on the node: ``orjson`` where the worker environment has it, the standard library's ``json`` otherwise.

The node's request server reads and writes JSON for every request and every turn of its event loop, and orjson
does that several times faster. Both read and write the same documents, except that orjson refuses NaN and
integers beyond 64 bits, which the gateway (orjson too) never sends on.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # the worker package needs only the standard library for this
    orjson = None  # type: ignore[assignment]


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON text in UTF-8."""
    if orjson is not None:
        return orjson.dumps(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(text: bytes | str) -> Any:
    """The value of JSON ``text``; ``ValueError`` when it is not JSON."""
    if orjson is not None:
        return orjson.loads(text)
    return json.loads(text)
