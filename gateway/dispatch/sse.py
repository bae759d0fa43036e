"""Cutting a byte stream into whole server-sent events, read as the standard reads them (``compute_functions.sse``)."""

from __future__ import annotations

from compute_functions.sse import LineEndings, event_data

_DONE = b"[DONE]"


class EventSplitter:
    """Passes on whole events only, each as soon as its blank line arrives, with LF line endings whatever the
    backend used (CRLF and CR are allowed by the standard; the gateway's own readers of events expect LF).

    An in-band error added after a broken stream can then never land in the middle of an event.
    """

    def __init__(self) -> None:
        self.pending = b""
        self.saw_done = False
        self._endings = LineEndings()

    def feed(self, data: bytes) -> bytes:
        """The events that ``data`` completes (possibly none, possibly several), joined."""
        pending = self.pending + self._endings.feed(data)
        end = pending.rfind(b"\n\n")
        if end < 0:
            self.pending = pending
            return b""
        events, self.pending = pending[: end + 2], pending[end + 2 :]
        # Cheap test first: this runs for every piece of every stream.
        if _DONE in events[-64:]:
            start = events.rfind(b"\n\n", 0, end)
            self.saw_done = event_data(events[start + 2 if start >= 0 else 0 : end]) == _DONE
        else:
            self.saw_done = False
        return events

    @property
    def inside_event(self) -> bool:
        """Whether bytes of an unfinished event are left over."""
        return bool(self.pending.strip())
