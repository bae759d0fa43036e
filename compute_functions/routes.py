"""Where each operation lives on an OpenAI-compatible model server such as vLLM.

The gateway's operations are named after their OpenAI paths under ``/v1``. vLLM serves the
generation APIs there (``/v1/chat/completions``, ``/v1/responses``, Anthropic's ``/v1/messages``),
but its scoring and tokenizer routes from the server's root (``/rerank``, ``/score``, ``/tokenize``,
``/detokenize``): its ``/v1/score`` and ``/v1/rerank`` are deprecated aliases that log a warning on
every call, and there is no ``/v1/tokenize``. llama.cpp's server uses the same root paths.
"""

from __future__ import annotations

OPERATIONS = (
    "chat/completions",
    "completions",
    "embeddings",
    "responses",
    "messages",
    "messages/count_tokens",
    "rerank",
    "score",
    "tokenize",
    "detokenize",
)
_FROM_ROOT = frozenset({"rerank", "score", "tokenize", "detokenize"})


def path_of(op: str, prefix: str) -> str:
    """The path of ``op`` on a server whose OpenAI routes live under ``prefix`` (``/v1``, or ``/x/v1``)."""
    if op in _FROM_ROOT:
        return f"{prefix.removesuffix('/v1')}/{op}"
    return f"{prefix}/{op}"


def url_of(base_url: str, op: str) -> str:
    """The URL of ``op`` on the server whose OpenAI base URL is ``base_url`` (``http://host:port/v1``)."""
    scheme, _, rest = base_url.partition("://")
    host, slash, prefix = rest.partition("/")
    return f"{scheme}://{host}{path_of(op, slash + prefix)}"
