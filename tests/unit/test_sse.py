"""Server-sent events read as the HTML standard reads them, with the standard's own examples, in every line ending
and cut into pieces at every byte."""

from __future__ import annotations

import pytest

from compute_functions.sse import EventCounter, event_data
from gateway.dispatch.sse import EventSplitter

# The examples of https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation, with
# the data of the events they dispatch (an event without data is not dispatched; an unfinished one at the end is
# discarded).
EXAMPLES = [
    ("data: YHOO\ndata: +2\ndata: 10\n\n", [b"YHOO\n+2\n10"]),
    (": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
     [b"first event", b"second event", b" third event"]),
    ("data\n\ndata\ndata\n\n", [b"", b"\n"]),
    ("data:test\n\ndata: test\n\n", [b"test", b"test"]),
    ("event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\n", [b"73857293", b"2153"]),
]  # fmt: skip


def ending(text: str, newline: str) -> bytes:
    return text.replace("\n", newline).encode()


def dispatched(events: bytes) -> list[bytes]:
    found = [event_data(event) for event in events.split(b"\n\n")[:-1]]
    return [data for data in found if data is not None]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize(("text", "expected"), EXAMPLES)
def test_the_standards_examples_in_every_line_ending_and_every_cut(
    text: str, expected: list[bytes], newline: str
) -> None:
    stream = ending(text, newline)
    for cut in range(len(stream) + 1):
        splitter = EventSplitter()
        events = splitter.feed(stream[:cut]) + splitter.feed(stream[cut:])
        assert dispatched(events) == expected, (cut, events)
        assert not splitter.inside_event


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_byte_by_byte(newline: str) -> None:
    stream = b"".join(ending(text, newline) for text, _ in EXAMPLES)
    splitter = EventSplitter()
    events = b"".join(splitter.feed(stream[index : index + 1]) for index in range(len(stream)))
    assert dispatched(events) == [data for _, expected in EXAMPLES for data in expected]


def test_an_unfinished_event_is_left_over_and_not_passed_on() -> None:
    splitter = EventSplitter()
    # The standard's third example ends with a field and no blank line: that event is discarded.
    assert dispatched(splitter.feed(b"data\r\n\r\ndata\r\ndata\r\n\r\ndata:")) == [b"", b"\n"]
    assert splitter.inside_event


def test_a_final_lone_cr_ends_the_line_it_closes() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: x\r\r") == b"data: x\n\n"
    assert not splitter.inside_event


def test_a_byte_order_mark_at_the_start_is_dropped() -> None:
    assert EventSplitter().feed(b"\xef\xbb\xbfdata: x\n\n") == b"data: x\n\n"


@pytest.mark.parametrize(
    "stream",
    [b"data: [DONE]\n\n", b"data:[DONE]\r\n\r\n", b"data: {}\n\n: keep-alive\rdata: [DONE]\r\r", b"data: [DONE]\n\n\n"],
)
def test_the_end_of_an_openai_stream_is_seen_whatever_its_form(stream: bytes) -> None:
    splitter = EventSplitter()
    splitter.feed(stream)
    assert splitter.saw_done


def test_done_inside_a_longer_data_is_not_the_end() -> None:
    splitter = EventSplitter()
    splitter.feed(b'data: {"text": "[DONE]"}\n\n')
    assert not splitter.saw_done


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_the_worker_counts_events_whatever_the_line_endings_and_cuts(newline: str) -> None:
    stream = ending("data: a\n\ndata: b\n\n: comment\n\ndata: [DONE]\n\n", newline)
    for size in (1, 2, 3, 7, len(stream)):
        counter = EventCounter()
        for start in range(0, len(stream), size):
            counter.feed(stream[start : start + size])
        assert counter.events == 4, size
