"""Server-sent events as the HTML standard reads them: lines end in CRLF, LF or a lone CR; a blank line ends an
event; a line that starts with a colon is a comment; ``field: value`` loses one space after the colon; the
``data`` lines of an event are joined with LF (https://html.spec.whatwg.org/multipage/server-sent-events.html).

Used on the worker and in the gateway. Standard library only: workers import it without the gateway installed.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"


class LineEndings:
    """Rewrites a byte stream's CRLF and lone CR line endings to LF, across the pieces it arrives in.

    A piece that ends with CR has ended its line; an LF at the start of the next piece is then the second half of
    that CRLF and is dropped. A stream that uses LF only passes through as it is, at the cost of one search for CR
    per piece.
    """

    def __init__(self) -> None:
        self._skip_lf = False
        self._started = False

    def feed(self, data: bytes) -> bytes:
        if not self._started and data:
            self._started = True
            # The standard drops one byte order mark at the start of the stream.
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        if self._skip_lf and data:
            self._skip_lf = False
            if data.startswith(b"\n"):
                data = data[1:]
        if b"\r" not in data:
            return data
        self._skip_lf = data.endswith(b"\r")
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def event_data(event: bytes) -> bytes | None:
    """The data of one event (its lines, LF line endings, without the blank line), or None when it has no ``data``
    field and so is not dispatched (comments, ``id``, ``retry`` or ``event`` lines alone)."""
    data: list[bytes] | None = None
    for line in event.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if name != b"data":
            continue
        if colon and value.startswith(b" "):
            value = value[1:]
        if data is None:
            data = []
        data.append(value)
    return None if data is None else b"\n".join(data)


class EventCounter:
    """Counts the events a byte stream completes (blank lines, whatever the line endings), piece by piece."""

    def __init__(self) -> None:
        self._endings = LineEndings()
        self._last = b""
        self.events = 0

    def feed(self, data: bytes) -> None:
        data = self._endings.feed(data)
        if data:
            joined = self._last + data
            self.events += joined.count(b"\n\n")
            # An LF left unpaired at the end may end a line whose blank successor the next piece brings.
            trailing = len(joined) - len(joined.rstrip(b"\n"))
            self._last = b"\n" if trailing % 2 else b""
