"""Sampling parameters (per request) and the sampler: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from export.text_config import GenerationDefaults

MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs bound; vLLM's default max_logprobs)


@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's end-of-turn token
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n: each token's logprob and the n most likely (0..MAX_LOGPROBS)

    @classmethod
    def with_defaults(cls, defaults: GenerationDefaults, temperature: float | None = None,
                      top_p: float | None = None, top_k: int | None = None, **given) -> "SamplingParams":
        """A request's parameters; what it leaves out comes from the model's generation_config.json
        (do_sample false there means greedy unless a temperature is given)."""
        if temperature is None:
            temperature = 0.0 if defaults.do_sample is False else defaults.temperature
        pick = lambda v, d, neutral: v if v is not None else (d if d is not None else neutral)  # noqa: E731
        return cls(temperature=pick(temperature, None, 1.0), top_p=pick(top_p, defaults.top_p, 1.0),
                   top_k=pick(top_k, defaults.top_k, 0), **given)

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first impossible parameter (runtime/validation.py checks a
        client's values first, with the field's name; this is the engine's last line)."""
        if not (0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 <= self.top_k:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not -(2 ** 63) <= self.seed < 2 ** 64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop token ids {bad} are outside the vocabulary (0..{vocab_size - 1})")


class Sampler:
    """One torch.Generator per seeded request, so a seed reproduces a request's tokens whatever else
    is in its batch."""

    def __init__(self):
        self._generators: dict[int, torch.Generator] = {}

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]
               ) -> tuple[list[int], dict[int, str]]:
        """logits [N, V], one row per sequence, on any device -> (a token per row, {row: why it failed}).
        A row whose logits hold a NaN, or whose distribution is not finite, fails alone: the caller
        ends that request with the error and every other row keeps its token.

        Greedy rows take one batched max where the logits are (on a GPU: no [N, V] copy to the host);
        its values tell a NaN row at no extra cost. Only the rows that sample are copied to the host."""
        best, first = logits.max(-1)  # the first index of the maximum, as argmax
        out, finite = first.tolist(), (best == best).tolist()  # NaN != NaN
        failed = {i: "the model produced NaN logits for this request" for i, ok in enumerate(finite) if not ok}
        sampled = [i for i, p in enumerate(params) if p.temperature != 0 and i not in failed]
        if not sampled:
            return out, failed
        rows = logits[sampled].float().cpu()
        for i, row in zip(sampled, rows):
            try:
                out[i] = self._sample_row(row, seq_ids[i], params[i])
            except (RuntimeError, ValueError) as e:  # e.g. a distribution that is not finite
                failed[i] = f"sampling failed: {e}"
        return out, failed

    def _sample_row(self, row: torch.Tensor, sid: int, p: SamplingParams) -> int:
        x = row / p.temperature
        if p.top_k and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, -1)
            # keep the smallest prefix whose mass reaches top_p, and always the most likely token (a top_p
            # below float32's smallest number would otherwise drop every token)
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[0] = False
            x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
        probs = torch.softmax(x, -1)
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("the distribution is not finite")
        gen = None
        if p.seed is not None:
            gen = self._generators.get(sid)
            if gen is None:
                gen = self._generators[sid] = torch.Generator().manual_seed(p.seed)
        return int(torch.multinomial(probs, 1, generator=gen))
