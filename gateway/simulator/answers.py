"""The bodies and server-sent events of chat and completions answers, in the shapes vLLM gives them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.simulator.engine import Engine, Output

# A stream with no token delay would otherwise never give the event loop back until it ends.
YIELD_EVERY_TOKENS = 16
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Protocol:
    """What differs between the chat and the legacy completions answers."""

    id_prefix: str
    whole_object: str
    chunk_object: str
    chat: bool
    # vLLM's own fields of a whole answer, beside OpenAI's.
    vllm_fields: dict[str, None]


CHAT = Protocol(
    "chatcmpl-",
    "chat.completion",
    "chat.completion.chunk",
    chat=True,
    vllm_fields=dict.fromkeys(
        ("prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params", "metrics")
    ),
)
COMPLETION = Protocol(
    "cmpl-",
    "text_completion",
    "text_completion",
    chat=False,
    vllm_fields=dict.fromkeys(("kv_transfer_params", "ec_transfer_params", "metrics")),
)
USAGE_DETAILS = {"prompt_tokens_details": None, "completion_tokens_details": None}


@dataclass(slots=True)
class StreamProgress:
    """How many tokens a stream has sent, for the engine's count when the client leaves early."""

    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Answer:
    """One generation request, decided before it runs: its outputs are fixed, only their timing is left."""

    protocol: Protocol
    engine: Engine
    outputs: list[Output]
    prompt_tokens: int
    request_id: str
    created: int

    @property
    def steps(self) -> int:
        return max(len(output.pieces) for output in self.outputs)


class Chunks:
    """The server-sent events of one stream, as bytes built from parts serialized once per stream."""

    def __init__(self, answer: Answer, include_usage: bool, continuous_usage: bool) -> None:
        self.include_usage = include_usage
        self._chat = answer.protocol.chat
        self._prompt_tokens = answer.prompt_tokens
        self._continuous = continuous_usage
        self._envelope = {
            "id": answer.request_id,
            "object": answer.protocol.chunk_object,
            "created": answer.created,
            "model": answer.engine.model,
            "simulated": True,
        }
        self._head = b"data: " + orjson.dumps(self._envelope)[:-1] + b',"choices":[{"index":'
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def role(self, index: int) -> bytes:
        delta = b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
        return b"".join((self._head, str(index).encode(), delta, self._usage_tail(0)))

    def token(self, output: Output, step: int) -> bytes:
        text = orjson.dumps(output.pieces[step])
        content = b',"delta":{"content":' + text + b"}" if self._chat else b',"text":' + text
        if step == len(output.pieces) - 1:
            reason, stop_reason = orjson.dumps(output.finish_reason), orjson.dumps(output.stop_reason)
            finish = b',"logprobs":null,"finish_reason":' + reason + b',"stop_reason":' + stop_reason + b"}]"
        else:
            finish = b',"logprobs":null,"finish_reason":null}]'
        return b"".join((self._head, str(output.index).encode(), content, finish, self._usage_tail(step + 1)))

    def usage(self, completion_tokens: int) -> bytes:
        chunk = {**self._envelope, "choices": [], "usage": usage(self._prompt_tokens, completion_tokens)}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _usage_tail(self, completion_tokens: int) -> bytes:
        if not self._continuous:
            return self._tail
        return b',"usage":' + orjson.dumps(usage(self._prompt_tokens, completion_tokens)) + b"}\n\n"


def whole_choice(protocol: Protocol, output: Output) -> dict[str, Any]:
    # Every field vLLM's answers carry, null where the simulator has nothing to say (vLLM leaves out an empty
    # ``tool_calls``), so that a client written against vLLM finds each one.
    if protocol.chat:
        return {
            "index": output.index,
            "message": {
                "role": "assistant",
                "content": output.text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": output.finish_reason,
            "stop_reason": output.stop_reason,
            "token_ids": None,
            "routed_experts": None,
        }
    return {
        "index": output.index,
        "text": output.text,
        "logprobs": None,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
        "token_ids": None,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "routed_experts": None,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
