"""The MoE's static-shaped forms, which one runs at which step size, and what each costs.

Three forms of the same computation (export/model.py, Moe), exact to each other up to summation order:
- gather: each token's k chosen experts' weights gathered, batched matmuls. Reads only the chosen
  experts, but copies them once per (token, choice): the form for few tokens (decode).
- dense: every expert on every token, combined by a one-hot [T, E] matrix. Reads every expert once
  and does E/k times the useful FLOPs: the form for a middle range, if any.
- block: block-padded dispatch in two passes. An expert's first BLOCK_ROWS (token, choice) pairs
  take its row of an [E, B] grid, one batched matmul over the stored experts (no copy); the pairs
  past that go, by expert, into blocks of B rows (positions from a CumSum over the routing one-hot),
  each block gathering its expert's weights once. floor((T*k - 1)/B) + 1 blocks bound every routing,
  so the shapes stay static; FLOPs are about T*k + E*B rows' worth instead of T*E: the form for
  many tokens.

A `MoeSchedule` gives each form a contiguous range of token counts; forms without a range are not
exported. It is measured by `make bench` (bench/moe.py), given (`--moe-forms`), or modeled here
for an A100 (bytes and FLOPs per form at each T, the slower of the two; not measured).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .sharding import Shard

FORMS = ("gather", "dense", "block")
BLOCK_ROWS = 128  # rows per block of the block form: larger wastes rows, smaller gathers more weight copies
# The block form's version, recorded in the manifest: 1, one pass (every expert padded to whole blocks,
# each gathered; exports before 2026-12-02); 2, two passes (export/model.py block_dispatch). The memory
# plan sizes an export's activations by the version its graphs hold.
BLOCK_FORM = 2

# The modeled default: an A100-80GB (SXM), HBM bandwidth and dense BF16 tensor-core peak.
A100_BYTES_PER_S = 2.039e12
A100_FLOPS = 312e12


class ScheduleError(ValueError):
    """A --moe-forms spec that does not name forms with increasing ranges."""


@dataclass(frozen=True)
class MoeSchedule:
    """(form, largest token count) ranges, ascending; the last one reaches the export's max_tokens."""
    ranges: tuple[tuple[str, int], ...]
    source: str = ""
    block_form: int = BLOCK_FORM

    def __post_init__(self):
        last = 0
        for form, hi in self.ranges:
            if form not in FORMS:
                raise ScheduleError(f"MoE form {form!r} is not one of {FORMS}")
            if hi <= last:
                raise ScheduleError(f"MoE form ranges must grow: {self.spec()}")
            last = hi
        if not self.ranges or len({f for f, _ in self.ranges}) != len(self.ranges):
            raise ScheduleError(f"each MoE form at most once, at least one: {self.spec()}")

    @property
    def forms(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self.ranges)

    @property
    def max_tokens(self) -> int:
        return self.ranges[-1][1]

    def pick(self, tokens: int) -> str:
        for form, hi in self.ranges:
            if tokens <= hi:
                return form
        raise ValueError(f"a step of {tokens} tokens is past the export's largest ({self.max_tokens})")

    def span(self, form: str) -> tuple[int, int]:
        lo = 1
        for f, hi in self.ranges:
            if f == form:
                return lo, hi
            lo = hi + 1
        raise KeyError(form)

    def upto(self, max_tokens: int) -> "MoeSchedule":
        """The ranges that steps of at most max_tokens reach (a smaller --max-num-batched-tokens)."""
        ranges, lo = [], 1
        for f, hi in self.ranges:
            if lo <= max_tokens:
                ranges.append((f, min(hi, max_tokens)))
            lo = hi + 1
        return MoeSchedule(tuple(ranges), self.source, self.block_form)

    def spec(self) -> str:
        return ",".join(f"{f}:{hi}" for f, hi in self.ranges)

    @classmethod
    def parse(cls, spec: str, max_tokens: int, source: str = "") -> "MoeSchedule":
        """'gather:32,dense:256,block' (the last form's limit may be left out: up to max_tokens).
        Ranges past max_tokens are cut there; forms left without tokens are dropped."""
        ranges, lo = [], 1
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        for i, part in enumerate(parts):
            form, _, hi = part.partition(":")
            if not hi and i != len(parts) - 1:
                raise ScheduleError(f"{part!r}: only the last form may leave out its limit (form:tokens)")
            try:
                given = int(hi) if hi else max_tokens
            except ValueError:
                raise ScheduleError(f"{part!r}: the limit must be a token count (form:tokens)") from None
            if given < lo and lo <= max_tokens:
                raise ScheduleError(f"--moe-forms {spec!r}: each form's limit must be above the one before")
            top = min(given, max_tokens)
            if top >= lo:
                ranges.append((form.strip(), top))
                lo = top + 1
        if not ranges:
            raise ScheduleError(f"--moe-forms {spec!r} names no form")
        ranges[-1] = (ranges[-1][0], max_tokens)  # the last form covers the rest
        return cls(tuple(ranges), source)

    def to_json(self) -> list:
        return [[f, hi] for f, hi in self.ranges]

    @classmethod
    def from_json(cls, ranges: list, source: str = "", block_form: int = BLOCK_FORM) -> "MoeSchedule":
        return cls(tuple((f, int(hi)) for f, hi in ranges), source, block_form)


@dataclass(frozen=True)
class ShardShape:
    """One rank's experts: how many, and their intermediate width."""
    experts: int
    inter: int
    hidden: int
    top_k: int

    @classmethod
    def of(cls, cfg: ModelConfig, tp: int, expert_split: str) -> "ShardShape":
        s = Shard(tp, 0, expert_split)
        e0, e1 = s.expert_range(cfg)
        i0, i1 = s.inter_range(cfg)
        return cls(e1 - e0, i1 - i0, cfg.hidden_size, cfg.top_k)

    @property
    def expert_bytes(self) -> int:  # w13 and w2 of one expert, bf16
        return 3 * self.inter * self.hidden * 2


def blocks(s: ShardShape, tokens: int, rows: int = BLOCK_ROWS, version: int = BLOCK_FORM) -> int:
    """The block form's static count of gathered blocks. Version 2 (export/model.py block_dispatch):
    its second pass's, which sum over experts of ceil(max(pairs - rows, 0) / rows) never exceeds;
    version 1: every expert's pairs padded to whole blocks."""
    if version == 1:
        return -(-tokens * s.top_k // rows) + s.experts
    return (tokens * s.top_k - 1) // rows + 1


def _block_rows(s: ShardShape, nb: int, version: int) -> int:
    """Rows the block form computes: version 2 adds its first pass's [E, rows] grid."""
    return (nb + (s.experts if version != 1 else 0)) * BLOCK_ROWS


def traffic(form: str, s: ShardShape, T: int, block_form: int = BLOCK_FORM) -> tuple[float, float]:
    """(bytes moved, FLOPs) of one form's MoE at T tokens, counting its materialised copies."""
    E, I, H, k, W = s.experts, s.inter, s.hidden, s.top_k, s.expert_bytes
    per_row_flops = 2 * 3 * I * H
    if form == "gather":
        return 3 * T * k * W + T * k * (3 * I * 2 + H * 4), T * k * per_row_flops
    if form == "dense":
        return E * W + 2 * T * E * (3 * I * 2 + H * 4), T * E * per_row_flops
    nb = blocks(s, T, version=block_form)
    rows = _block_rows(s, nb, block_form)
    per_rows = 2 * rows * (2 * H * 2 + 3 * I * 2) + 3 * T * k * E * 4
    if block_form == 1:
        return 3 * nb * W + per_rows, rows * per_row_flops
    # Pass 1 reads every expert in place; pass 2 copies its blocks' experts (read, write, read again);
    # both passes' outputs are concatenated (written and read once more) before the per-pair read.
    return E * W + 3 * nb * W + per_rows + 2 * rows * H * 2, rows * per_row_flops


def scratch_bytes(form: str, s: ShardShape, T: int, block_form: int = BLOCK_FORM) -> int:
    """Live activations of one form at T tokens (its largest intermediate tensors together): what an
    engine of that form needs for its largest profile."""
    E, I, H, k, W = s.experts, s.inter, s.hidden, s.top_k, s.expert_bytes
    if form == "gather":
        return T * k * (W + 3 * I * 2 + H * 4)
    if form == "dense":
        return T * E * (2 * I * 2 + I * 2 + H * 4)
    nb = blocks(s, T, version=block_form)
    rows = _block_rows(s, nb, block_form)
    # version 2 holds the two passes' outputs and their concatenation at once: one more [rows, H]
    concat = rows * H * 2 if block_form != 1 else 0
    return nb * W + rows * (2 * H * 2 + 3 * I * 2) + concat + T * k * (2 * E * 4 + H * 4)


def modeled_seconds(form: str, s: ShardShape, T: int, bw: float = A100_BYTES_PER_S,
                    flops: float = A100_FLOPS) -> float:
    nbytes, nflops = traffic(form, s, T)
    return max(nbytes / bw, nflops / flops)


def merge_ranges(ranges: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(form, largest T) runs in order -> one range per form: a form that wins again after another
    one does not get a second range; the range before it grows instead."""
    out: list[tuple[str, int]] = []
    for form, hi in ranges:
        if out and (out[-1][0] == form or any(f == form for f, _ in out)):
            out[-1] = (out[-1][0], hi)
        else:
            out.append((form, hi))
    return out


def schedule_from_times(best: list[str], source: str) -> MoeSchedule:
    """best[T-1]: the fastest form at T tokens -> a schedule."""
    return MoeSchedule(tuple(merge_ranges([(f, T) for T, f in enumerate(best, start=1)])), source)


def modeled_schedule(cfg: ModelConfig, tp: int, expert_split: str, max_tokens: int) -> MoeSchedule:
    """The fastest form at each T by the A100 model (not measured)."""
    s = ShardShape.of(cfg, tp, expert_split)
    best = [min(FORMS, key=lambda f: modeled_seconds(f, s, T)) for T in range(1, max_tokens + 1)]
    return schedule_from_times(best, "modeled for an A100 (not measured for this shape)")


def schedule_scratch(sched: MoeSchedule, s: ShardShape) -> int:
    """The largest live MoE activations over the schedule (each form at the top of its range)."""
    return max(scratch_bytes(f, s, hi, sched.block_form) for f, hi in sched.ranges)
