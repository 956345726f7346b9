"""A request's generated tokens as text, split into thinking and answer, with stop strings.

After the published generation prompt (`]~b]ai\n<think>\n`) the model's output starts inside the
thinking block and never writes an opening <think>: everything up to </think> is reasoning, the rest
is the answer. Start with `thinking=codec.in_thinking(prompt)` so a raw prompt, or one whose thinking
was closed in the prompt, starts in the answer. The <think>/</think> tokens themselves are not shown.

Stop strings are checked on each channel's text as it grows; text that may be the start of a stop
string is held back until decided, and the stop string itself is never shown.
"""
from __future__ import annotations

from dataclasses import dataclass

from .text import Detokenizer, TextCodec

REASONING, CONTENT = "reasoning", "content"


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __iadd__(self, other: "Delta") -> "Delta":
        self.reasoning += other.reasoning
        self.content += other.content
        return self


class OutputText:
    def __init__(self, codec: TextCodec, thinking: bool, stops: list[str] | None = None):
        self.codec = codec
        self.channel = REASONING if thinking else CONTENT
        self.stops = [s for s in stops or [] if s]
        self.stopped = False  # a stop string was seen: the request should end
        self.stop_hit: str | None = None  # which one (the earliest in the text; Anthropic's stop_sequence)
        self._detok = {REASONING: Detokenizer(codec), CONTENT: Detokenizer(codec)}
        self._held = {REASONING: "", CONTENT: ""}

    def feed(self, token: int) -> Delta:
        """This token's text (possibly empty); after a stop string, nothing more."""
        if self.stopped:
            return Delta()
        if token == self.codec.think_end and self.codec.think_end is not None:
            self.channel = CONTENT
            return self._release(REASONING, self._detok[REASONING].flush(), final=True)
        if token == self.codec.think_start and self.codec.think_start is not None:
            self.channel = REASONING
            return self._release(CONTENT, self._detok[CONTENT].flush(), final=True)
        if token in self.codec.literal:  # the tool-call tags: their text, in order
            d = self._detok[self.channel]
            return self._release(self.channel, d.flush() + self.codec.literal[token], final=False)
        return self._release(self.channel, self._detok[self.channel].feed(token), final=False)

    def finish(self) -> Delta:
        """At the end of the request: what is still held back (unless a stop string ended it)."""
        out = Delta()
        for ch in (REASONING, CONTENT):
            out += self._release(ch, self._detok[ch].flush(), final=True)
        return out

    def _release(self, ch: str, text: str, final: bool) -> Delta:
        if self.stopped:
            return Delta()
        held = self._held[ch] + text
        hits = [(i, s) for s in self.stops if (i := held.find(s)) >= 0]
        if hits:
            self.stopped = True
            at, self.stop_hit = min(hits, key=lambda h: h[0])
            out, self._held[ch] = held[:at], ""
        elif final:
            out, self._held[ch] = held, ""
        else:
            # Keep back the longest tail that is a proper prefix of some stop string.
            keep = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if held.endswith(s[:n])), default=0)
            out, self._held[ch] = held[:len(held) - keep], held[len(held) - keep:]
        return Delta(reasoning=out) if ch == REASONING else Delta(content=out)
