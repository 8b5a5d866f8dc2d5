"""Stop strings and incremental text release for a token-by-token decoder (the embedded engine's).

A decoder re-decodes its tokens after each step and asks `StopStrings.feed(text)` what may be sent. Text is held
back while it could still be cut: a tail that is a prefix of a stop string, and a tail of U+FFFD characters (a
byte-level tokenizer decodes a character whose bytes have not all arrived yet as U+FFFD). The two combine: with the
stop string "Zü" and text ending "Z" + half of "ü" (decoded "Z\\ufffd"), both characters are held, so "Z" never
leaks to the client when the "ü" completes the stop string.

Contract:
- `feed(text)` takes the whole text decoded so far and returns `(delta, stopped)`: the text that may be sent now,
  and whether a stop string was found (then `delta` ends where the stop string begins and nothing more is to be
  fed). `flush(text)` returns the held tail when generation ends without a stop string.
- `sent` is exactly the concatenation of every delta returned: what the client received, hence what is logged.
- Stop strings match anywhere in the generated text, including across token boundaries, never in the prompt.
  An empty stop string matches nothing (as in the OpenAI API and vLLM).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class StopStrings:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self.sent = ""

    def _held(self, text: str) -> int:
        """How many characters at the end of `text` must wait: partial UTF-8 characters plus a stop-string prefix."""
        core = text.rstrip(REPLACEMENT)
        partial = len(text) - len(core)
        prefix = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(core)), prefix, -1):
                if core.endswith(s[:n]):
                    prefix = n
                    break
        return partial + prefix

    def feed(self, text: str) -> tuple[str, bool]:
        start = len(self.sent)
        if not text.startswith(self.sent):
            # The decoder rewrote text already sent (some tokenizers clean up spaces after the fact): what was sent
            # stands; carry on from its length.
            text = self.sent + text[start:]
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        if hits:
            end = min(hits)
            delta = text[start:end]
            self.sent += delta
            return delta, True
        end = len(text) - self._held(text)
        if end <= start:
            return "", False
        delta = text[start:end]
        self.sent += delta
        return delta, False

    def flush(self, text: str) -> str:
        """The held tail, once generation ended without a stop string (length limit or end of sequence)."""
        if not text.startswith(self.sent):
            text = self.sent + text[len(self.sent):]
        delta = text[len(self.sent):]
        self.sent += delta
        return delta
