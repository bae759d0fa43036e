"""What stands in for the model: request slots, counters, and deterministic synthetic outputs.

An ``Engine`` plays the part of one vLLM engine: at most ``max_num_seqs`` requests run at once, the rest wait
in arrival order. Outputs are words drawn from a fixed vocabulary at a position chosen by a CRC of the prompt,
so the same request always gets the same answer, on any machine and in any process.
"""

from __future__ import annotations

import asyncio
import base64
import math
import sys
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass
from hashlib import shake_128
from itertools import accumulate

_WORDS = """
    the of and to in is that for it as was with be by on not he this are or his from at which but have an had they
    you were their one all we can her has there been if more when will would who so no she other its may these what
    them than some him time into only do such about two new first could very any like our then also most made over
    did many before must through years where much your way well down should because each just those people how too
    little state good world make still own see men work long here between both life being under never day same
    another know while last might great old year off come since against go came right used take three himself few
    house use during without again place around however home small found thought went say part once general high
    upon school every does got united left number course war until always away something fact though water less
    public put think almost hand enough far took head yet government system better set told nothing night end why
    called find going look asked later point knew city next program business give group toward young days let room
    side social present given several order national second possible rather per face among form important often
    early white case large
"""
VOCABULARY: tuple[str, ...] = tuple(_WORDS.split())

# One long pseudo-random word sequence, built once; an answer is a window into it, so making an answer is a
# slice in C instead of a loop of Python arithmetic per token.
_PERIOD = 8192
_SEQUENCE: list[str] = []
_state = 0x2545F4914F6CDD1D
for _ in range(_PERIOD):
    _state = (_state * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
    _SEQUENCE.append(" " + VOCABULARY[(_state >> 33) % len(VOCABULARY)])
_WINDOWS = _SEQUENCE + _SEQUENCE
del _state


def prompt_seed(text: str) -> int:
    """A stable 32-bit seed for a prompt (``hash()`` is salted per process, CRC-32 is not)."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def synthesize(seed: int, count: int) -> list[str]:
    """``count`` tokens for ``seed``, each a vocabulary word with its leading space."""
    start = seed % _PERIOD
    if count <= _PERIOD:
        return _WINDOWS[start : start + count]
    whole, rest = divmod(count, _PERIOD)
    return _WINDOWS[start : start + _PERIOD] * whole + _WINDOWS[start : start + rest]


@dataclass(slots=True)
class Output:
    """One choice's generated text, token by token, and why it ended.

    ``pieces`` holds the text each generated token added; the last piece is cut short when a stop string
    ended the output. ``stop_reason`` is the stop string that matched, as vLLM reports it.
    """

    index: int
    pieces: list[str]
    finish_reason: str
    stop_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def generate(index: int, seed: int, max_tokens: int, stop: tuple[str, ...]) -> Output:
    """The output for one choice: ``max_tokens`` tokens, or fewer when a stop string shows up in the text.

    As in vLLM, the text is checked after each token; the first token whose text completes a stop string
    ends the output, the text is cut just before that string, and the token still counts as generated.
    """
    pieces = synthesize(seed, max_tokens)
    text = "".join(pieces)
    found = [(candidate, text.find(candidate)) for candidate in stop]
    found = [(candidate, start) for candidate, start in found if start >= 0]
    if not found:
        return Output(index, pieces, "length")
    ends = list(accumulate(len(piece) for piece in pieces))

    def completing_token(match: tuple[str, int]) -> int:
        candidate, start = match
        return bisect_left(ends, start + len(candidate))

    # min() keeps the first of equals, which is the order vLLM checks the stop strings in.
    candidate, start = min(found, key=completing_token)
    token = completing_token((candidate, start))
    # The stop string may span several tokens: each still counts, but the text they add ends where it starts.
    kept = pieces[: token + 1]
    first = bisect_right(ends, start)
    kept[first] = pieces[first][: start - (ends[first] - len(pieces[first]))]
    for later in range(first + 1, token + 1):
        kept[later] = ""
    return Output(index, kept, "stop", candidate)


def embed(text: str, dimensions: int) -> array[float]:
    """A unit-length float32 vector for ``text``, the same for the same text everywhere."""
    raw = array("i", shake_128(text.encode("utf-8", "surrogatepass")).digest(4 * dimensions))
    if sys.byteorder != "little":
        raw.byteswap()
    norm = math.sqrt(math.fsum(float(x) * x for x in raw)) or 1.0
    return array("f", [x / norm for x in raw])


def float32_base64(vector: array[float]) -> str:
    """The vector as little-endian float32 bytes in base64, as the OpenAI API sends ``encoding_format=base64``."""
    if sys.byteorder == "little":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    swapped = array("f", vector)
    swapped.byteswap()
    return base64.b64encode(swapped.tobytes()).decode("ascii")


FINISH_REASONS = ("stop", "length", "abort")


class Engine:
    """One model's scheduler and counters, in the shape vLLM reports them on ``/metrics``.

    ``acquire`` takes a slot, waiting in arrival order when ``max_num_seqs`` requests are already running;
    every successful ``acquire`` must be paired with one ``release``.
    """

    def __init__(self, model: str, max_num_seqs: int) -> None:
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued ahead; never waits."""
        if self.running < self.max_num_seqs and not self._waiters:
            self.running += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just before the cancellation landed: give it on.
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                # The slot passes straight to the next request, so ``running`` does not change.
                waiter.set_result(None)
                return
        self.running -= 1

    def record(self, generation_tokens: int, finish_reasons: list[str]) -> None:
        self.generation_tokens += generation_tokens
        for reason in finish_reasons:
            self.finished[reason] += 1
