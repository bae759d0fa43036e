"""Token counts from a relayed event stream, without parsing every event.

The gateway asks backends for usage in every stream (``stream_options.include_usage``), so the
usage always arrives as one final chunk with ``"choices": []``. Only a chunk that holds a usage
object is parsed; when the client did not ask for usage, that chunk is taken out of its stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from compute_functions.sse import event_data
from gateway.accounting.record import RequestRecord

_USAGE_OBJECT = (b'"usage":{', b'"usage": {')
# What backends put in every chunk once usage is asked for; a client that did not ask never sees it.
NULL_USAGE = b',"usage":null'


def asks_for_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def with_usage(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` asking the backend to end its stream with a usage chunk."""
    options = body.get("stream_options")
    return {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}


# APIs whose streams report usage in their own events, unasked: OpenAI's Responses in ``response.completed``
# (the response with its usage), Anthropic's Messages in ``message_start`` (input tokens) and ``message_delta``
# (output tokens). Their streams reach the client unchanged.
OWN_USAGE_EVENTS = frozenset({"responses", "messages"})


def take_event_usage(events: bytes, record: RequestRecord) -> bytes:
    """Record the usage reported in ``events`` (whole SSE events of an ``OWN_USAGE_EVENTS`` API)."""
    for event in events.split(b"\n\n"):
        if not any(marker in event for marker in _USAGE_OBJECT):
            continue
        try:
            data = orjson.loads(event_data(event) or b"")
        except orjson.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            continue
        holder = data.get("response") or data.get("message")
        record.take_usage(holder.get("usage") if isinstance(holder, dict) else data.get("usage"))
    return events


def take_usage(events: bytes, record: RequestRecord, keep: bool) -> bytes:
    """Record the usage in ``events`` (one or more whole SSE events); drop its usage-only chunk unless ``keep``."""
    for marker in _USAGE_OBJECT:
        at = events.rfind(marker)
        if at >= 0:
            break
    else:
        return events
    start = events.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    end = events.find(b"\n\n", at)
    end = len(events) if end < 0 else end + 2
    try:
        chunk = orjson.loads(event_data(events[start:end]) or b"")
    except orjson.JSONDecodeError:
        return events
    if not isinstance(chunk, dict):
        return events
    record.take_usage(chunk.get("usage"))
    if keep or chunk.get("choices"):
        return events
    return events[:start] + events[end:]


def for_client(events: bytes, record: RequestRecord) -> bytes:
    """``events`` as the client should get them, with their usage recorded; may be empty."""
    if record.op in OWN_USAGE_EVENTS:
        return take_event_usage(events, record)
    if not record.keep_usage:
        events = events.replace(NULL_USAGE, b"")
    return take_usage(events, record, record.keep_usage)
