"""The node's JSON: the same documents with orjson and with the standard library alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compute_functions import json_codec

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = {"stream": {"id": "s-1"}, "payload": {"messages": [{"content": 'naïve \u2028 line\nnext "quoted"'}]}}


def test_a_request_and_its_pieces_survive_the_round_trip() -> None:
    text = json_codec.dumps(DOCUMENT)
    assert isinstance(text, bytes) and b"\n" not in text  # a hand-over is one line
    assert json_codec.loads(text) == DOCUMENT
    assert json_codec.loads(text.decode()) == DOCUMENT
    with pytest.raises(ValueError):
        json_codec.loads(b"{not json")


def test_without_orjson_the_standard_library_writes_the_same_values() -> None:
    # A worker environment without orjson: the module must load, and what it writes the other one reads.
    script = (
        "import sys; sys.modules['orjson'] = None; sys.path.insert(0, sys.argv[1]);"
        "from compute_functions import json_codec as c; import json;"
        "d = json.loads(sys.argv[2]); t = c.dumps(d); assert b'\\n' not in t and c.orjson is None;"
        "sys.stdout.buffer.write(t)"
    )
    written = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), json_codec.dumps(DOCUMENT).decode()],
        check=True,
        capture_output=True,
    ).stdout
    assert json_codec.loads(written) == DOCUMENT
