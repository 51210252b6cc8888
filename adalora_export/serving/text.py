"""Generated text as its tokens arrive: pieces that never change once shown, stop strings, the final text.

A character may span several tokens (byte-level BPE splits an emoji into up to four), and until its
last byte arrives the decoded tail ends in U+FFFD. ``RowText`` decodes a row's whole tail at each
token and shows only what is stable: it holds back a trailing U+FFFD until a later token completes
the character (or the row ends with it), and an ending that could be the start of a stop string. The
pieces, concatenated, are the row's final ``text``: the decode of all its tokens, cut before the first
stop string it contains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class RowText:
    """One row's text: ``add(token)`` returns the new stable piece (maybe ""), ``finish()`` the rest once
    the row has ended; ``stopped`` turns true when the text contains a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False
        self.finished = False
        self._decode = decode
        self._stop = tuple(stop)
        self._text: str | None = ""  # the decode of ``ids`` (cut at a stop string), None when stale

    @property
    def text(self) -> str:
        """The decode of every token so far, cut before the first stop string."""
        if self._text is None:
            self._text = self._cut(self._decode(self.ids))
        return self._text

    def add(self, token: int) -> str:
        """Take the row's next token; the text it makes final, if any."""
        self.ids.append(token)
        self._text = None
        text = self.text
        if self.stopped:
            return self.finish()
        stable = text.rstrip(REPLACEMENT)  # a character still missing bytes
        return self._show(stable[: len(stable) - self._stop_prefix(stable)])

    def finish(self) -> str:
        """The row has ended: the rest of its text (a held-back U+FFFD included)."""
        self.finished = True
        return self._show(self.text)

    def _show(self, stable: str) -> str:
        # A decoder may rewrite earlier text (cleanup of spaces): then nothing is shown until it agrees again.
        if len(stable) <= len(self.shown) or not stable.startswith(self.shown):
            return ""
        piece, self.shown = stable[len(self.shown) :], stable
        return piece

    def _cut(self, text: str) -> str:
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if found:
            self.stopped = True
            return text[: min(found)]
        return text

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest ending of ``text`` that begins a stop string (held back: it may become one)."""
        return max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
