"""One choice's output as the embedded engine decodes it: tokens in, `TextDelta`/`Finished` events out.

Contract:
- `ChoiceStream(index, sampler, ...)` holds one choice's decoding state: its `ChoiceSampler` (what picks the next
  token), the tokens generated so far (`seq`: prompt + generated ids), the stop strings (`StopStrings`, which hold
  back a tail that could still become a stop string or is half a UTF-8 character) and, when asked for, the logprobs.
- `add(token, logprob, top)` takes the token the sampler chose and emits what may be sent now; it returns True when
  the choice has ended: end of sequence (`finish_reason` "stop", the token is not counted), a stop string ("stop";
  the text ends where the stop string begins), or `max_tokens` tokens ("length"). The choice's `Finished` is
  emitted then. `cancel()` ends it with "cancelled" (what was held back is not sent).
- The deltas' texts joined equal `Finished.text`; the deltas' logprobs joined equal `Finished.logprobs`.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Finished, SamplingParams, TextDelta, TokenLogprob
from .logprobs import TokenTexts, token_logprob
from .sampling import ChoiceSampler
from .stop_strings import StopStrings


class ChoiceStream:
    """See the module docstring. `emit` is called with each event, on the decoding thread."""

    def __init__(self, index: int, sampler: ChoiceSampler, params: SamplingParams, prompt_ids: list[int],
                 adapter: str | None, tokenizer: Any, texts: TokenTexts, eos_ids: set[int],
                 emit: Callable[[Any], None]):
        self.index = index
        self.sampler = sampler
        self.seq = list(prompt_ids)  # prompt + generated: what the logits processors see
        self._prompt_tokens = len(prompt_ids)
        self._max_tokens = params.max_tokens
        self._adapter = adapter
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._emit = emit
        self._out: list[int] = []
        self._text = ""
        self._stops = StopStrings(params.stop)
        self._lps = _LogprobTrack(texts) if params.logprobs else None
        self.done = False
        if self._max_tokens <= 0:
            self._finish("length")

    def add(self, token: int, logprob: float | None, top: list) -> bool:
        if token in self._eos_ids:
            self._finish("stop")
            return True
        self._out.append(token)
        self.seq.append(token)
        text = self._text = self._tokenizer.decode(self._out, skip_special_tokens=True)
        lps, stops = self._lps, self._stops
        if lps is not None:
            lps.add(token, logprob, top, text)
        delta, stopped = stops.feed(text)
        if stopped:
            got = lps.take_rest(len(stops.sent)) if lps else ()
            if delta or got:
                self._emit(TextDelta(delta, self.index, got))
            self._finish("stop", cut=True)
            return True
        if delta:
            self._emit(TextDelta(delta, self.index, lps.take(len(stops.sent)) if lps else ()))
        if len(self._out) >= self._max_tokens:
            self._finish("length")
            return True
        return False

    def cancel(self) -> None:
        if not self.done:
            self._finish("cancelled", cut=True)

    def _finish(self, reason: str, cut: bool = False) -> None:
        lps, stops = self._lps, self._stops
        if not cut:  # the end of sequence or the length limit: release what was held back
            rest = stops.flush(self._text)
            got = lps.take_rest(len(stops.sent)) if lps else ()
            if rest or got:
                self._emit(TextDelta(rest, self.index, got))
        self.done = True
        self._emit(Finished(stops.sent, reason, self._prompt_tokens, len(self._out), self._adapter, self.index,
                            tuple(lps.done) if lps else None))


class _LogprobTrack:
    """Attaches each generated token's logprob to the delta that completes its text.

    A byte-level token may end inside a UTF-8 character (the decoded text then ends in U+FFFD); its text end is
    known once the character is whole, so ends are assigned when the decoded text is stable.
    """

    def __init__(self, texts: TokenTexts):
        self.texts = texts
        self.pending: list[tuple[int, float, list, int | None]] = []  # (id, logprob, top, end)
        self.done: list[TokenLogprob] = []
        self.offset = 0

    def add(self, token: int, logprob: float | None, top: list, text: str) -> None:
        self.pending.append((token, float(logprob or 0.0), top, None))
        if not text.endswith("\ufffd"):
            self.pending = [(t, lp, tp, len(text) if end is None else end) for t, lp, tp, end in self.pending]

    def take(self, upto: int) -> tuple[TokenLogprob, ...]:
        """The tokens whose text ends at or before character `upto`."""
        out = []
        while self.pending and self.pending[0][3] is not None and self.pending[0][3] <= upto:
            out.append(self._emit(self.pending.pop(0)))
        return tuple(out)

    def take_rest(self, length: int) -> tuple[TokenLogprob, ...]:
        """At the end of a choice: every remaining token that starts inside its `length` characters of text."""
        out = []
        while self.pending and self.offset < length:
            out.append(self._emit(self.pending.pop(0)))
        self.pending.clear()
        return tuple(out)

    def _emit(self, item: tuple[int, float, list, int | None]) -> TokenLogprob:
        token, logprob, top, end = item
        lp = token_logprob(self.texts, token, logprob, top, self.offset)
        self.offset = end if end is not None else self.offset
        self.done.append(lp)
        return lp
