"""Cutting a byte stream into whole server-sent events."""

from __future__ import annotations

_DONE = b"data: [DONE]\n\n"


class EventSplitter:
    """Passes on whole events only, each as soon as its blank line arrives.

    An in-band error added after a broken stream can then never land in the middle of an event.
    """

    def __init__(self) -> None:
        self.pending = b""
        self.saw_done = False

    def feed(self, data: bytes) -> bytes:
        """The events that ``data`` completes (possibly none, possibly several), joined."""
        pending = self.pending + data
        end = pending.rfind(b"\n\n")
        if end < 0:
            self.pending = pending
            return b""
        events, self.pending = pending[: end + 2], pending[end + 2 :]
        self.saw_done = events.endswith(_DONE)
        return events

    @property
    def inside_event(self) -> bool:
        """Whether bytes of an unfinished event are left over."""
        return bool(self.pending.strip())
