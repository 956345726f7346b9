"""Sampling parameters (per request) and the sampler: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from export.text_config import GenerationDefaults

from .host_copy import to_device

MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs bound; vLLM's default max_logprobs)


@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's end-of-turn token
    ignore_eos: bool = False   # go on past the model's end tokens (stop_token_ids still stop)
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


_ARGMAX = SamplingParams(temperature=0)


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

        Greedy and unseeded rows are sampled where the logits are (`sample_on_device`: on a GPU no
        [N, V] copy to the host). Only seeded rows are copied to the host, to their request's generator,
        so that a seed gives the same tokens whatever the device or the batch."""
        # seeded rows only take the max there (its NaN check), then sample on the host below
        tokens, status = sample_on_device(logits, [p if on_device(p) else _ARGMAX for p in params])
        out, codes = tokens.tolist(), status.tolist()
        failed = {i: FAILURES[c] for i, c in enumerate(codes) if c}
        sampled = [i for i, p in enumerate(params) if not on_device(p) and i not in failed]
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


def on_device(p: SamplingParams) -> bool:
    """Whether `sample_on_device` takes this row (async scheduling): greedy, or sampled without a seed.
    A seeded request keeps its host generator, so its tokens are the same whatever path a step takes."""
    return p.temperature == 0 or p.seed is None


NAN, NOT_FINITE = 1, 2  # sample_on_device's failure codes (0: sampled)
FAILURES = {NAN: "the model produced NaN logits for this request",
            NOT_FINITE: "sampling failed: the distribution is not finite"}


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] -> (a token per row [N] int64, a status per row [N] int64: 0, NAN or NOT_FINITE),
    both where the logits are, with no host sync (rows that `on_device` takes; seeds are not used).
    Greedy rows: the first maximum, as Sampler. Sampled rows: temperature, then the top_k largest
    (exactly k: ties at the k-th value are cut by position, where Sampler keeps them all), then the
    smallest prefix of those reaching top_p (always the most likely), drawn by an exponential race
    (argmax of p / Exp(1): a draw from p). On a GPU this is a few batched kernels where the host's
    per-row sort of a 200K vocabulary took ~15 ms a row."""
    dev = logits.device
    best, first = logits.max(-1)
    status = best.isnan().long()  # NAN is 1
    rows = [i for i, p in enumerate(params) if p.temperature != 0]
    if not rows:
        return first, status
    V = logits.shape[-1]
    ks = [p.top_k if 0 < p.top_k < V else V for p in (params[i] for i in rows)]
    host = torch.tensor([[float(i) for i in rows], [params[i].temperature for i in rows], ks,
                         [params[i].top_p for i in rows]], dtype=torch.float64)
    at, temp, k, top_p = to_device(host, dev).unbind(0)
    at = at.long()
    x = logits.index_select(0, at).float() / temp[:, None].float()
    kmax = max(ks)
    vals, ids = torch.topk(x, kmax, dim=-1) if kmax < V else torch.sort(x, dim=-1, descending=True)
    vals = vals.masked_fill(torch.arange(kmax, device=dev)[None, :] >= k[:, None], float("-inf"))
    if any(params[i].top_p < 1 for i in rows):
        probs = torch.softmax(vals, -1)
        drop = probs.cumsum(-1) - probs >= top_p[:, None].float()
        drop[:, 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
    probs = torch.softmax(vals, -1)
    race = probs / torch.empty_like(probs).exponential_()
    tokens = ids.gather(1, race.argmax(-1, keepdim=True))[:, 0]
    first = first.clone()
    first[at] = tokens
    bad = status.index_select(0, at)
    status = status.index_copy(0, at, torch.where((bad == 0) & ~torch.isfinite(probs).all(-1), NOT_FINITE, bad))
    return first, status
