"""Part: the host's work per decode step alone -- the scheduler, the block manager and the step's
inputs (runtime/step_inputs.py: token ids, positions, slots, context lengths, block-table rows) --
with no model, at S sequences of C context tokens each: microseconds per step, the median over many
steps (a block fills every block_size steps, so they include prefix-cache hashing; the sizes take
turns), and each size against the shortest context at the same batch, in the same run. The goal is a step's host work
independent of the context: 128K within 1.2x of 1K, under 1 ms at batch 64. Not counted: the device
side of the block tables (runtime/block_tables.py DeviceTables: set the written entries, gather the
step's rows), which on a GPU is device work.

Also the host's work for one prompt's prefill step (`what=prefill`: schedule, the step's inputs, the
prefix-cache hashing of its blocks) at 2048 and 8192 tokens. The schedule and the inputs come before
the step's launch, so they add to the time to first token; the engine hashes while the device
computes the step, so that part is hidden behind a long enough step.
"""
from __future__ import annotations

import statistics
import time

from runtime.block_manager import BlockManager
from runtime.block_tables import TableRows
from runtime.sampling import SamplingParams
from runtime.scheduler import Scheduler
from runtime.sequence import Sequence
from runtime.step_inputs import build_step, record_computed

from .common import Results

SIZES = ((64, 1024), (64, 32768), (64, 131072), (8, 131072))
BLOCK_SIZE = 16  # the runtime's default (runtime/config.py)


class HostStep:
    """A scheduler and block manager with S running sequences of `context` tokens, stepped as the
    engine steps them, less the model (each sampled token is 1)."""

    def __init__(self, seqs: int, context: int, steps: int, block_size: int = BLOCK_SIZE):
        self.blocks = BlockManager(seqs * -(-(context + steps + 1) // block_size), block_size)
        # the first step computes every prompt at once; decode steps need a token per sequence
        self.scheduler = Scheduler(self.blocks, seqs, seqs * context)
        self.rows = TableRows()
        params = SamplingParams(temperature=0, max_tokens=1 << 40, ignore_eos=True)
        for i in range(seqs):  # a distinct first token: no prefix shared, every block the sequence's own
            self.scheduler.add(Sequence([i] + [t % 200 for t in range(context - 1)], params))
        self.step()
        self.scheduler.max_num_batched_tokens = seqs

    def step(self):
        batch = self.scheduler.schedule()
        inputs = build_step(batch, self.blocks.block_size, self.rows)
        done = [batch.completes(i) for i in range(len(batch.seqs))]
        record_computed(batch, self.blocks)
        for seq, d in zip(batch.seqs, done):
            if d:
                seq.output.append(1)
        return inputs


def step_seconds(sizes, steps: int, rounds: int = 8) -> dict[tuple[int, int], float]:
    """Median seconds per step at each (seqs, context). The sizes take turns, `steps / rounds` steps
    at a time, so that a busy spell of the machine lands on all of them alike."""
    hosts = {(s, c): HostStep(s, c, BLOCK_SIZE + steps) for s, c in sizes}
    times: dict[tuple[int, int], list[float]] = {k: [] for k in hosts}
    for h in hosts.values():
        for _ in range(BLOCK_SIZE):  # warm up, one block's worth of steps
            h.step()
    per_turn = -(-steps // rounds)
    for _ in range(rounds):
        for (s, c), h in hosts.items():
            for _ in range(per_turn):
                t0 = time.perf_counter()
                inputs = h.step()
                times[s, c].append(time.perf_counter() - t0)
                if inputs.decode_tokens != s:
                    raise RuntimeError(f"a step decoded {inputs.decode_tokens} tokens, not {s}: timings invalid")
    return {k: statistics.median(v) for k, v in times.items()}


def prefill_seconds(tokens: int, reps: int = 20) -> float:
    """Median seconds of the host's work for one fresh prompt of `tokens` tokens in one step."""
    times = []
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for r in range(reps):
        blocks = BlockManager(-(-tokens // BLOCK_SIZE) + 2, BLOCK_SIZE)
        scheduler = Scheduler(blocks, 1, tokens)
        seq = Sequence([(r * 7919 + t * 31) % 150_000 for t in range(tokens)], params)  # no prefix hits
        t0 = time.perf_counter()
        scheduler.add(seq)
        batch = scheduler.schedule()
        build_step(batch, BLOCK_SIZE, TableRows())
        record_computed(batch, blocks)
        times.append(time.perf_counter() - t0)
        if batch.num_new != [tokens]:
            raise RuntimeError(f"the prompt ran as {batch.num_new} tokens, not one step of {tokens}")
    return statistics.median(times)


def run(res: Results, sizes=SIZES, steps: int = 256, prompts=(2048, 8192)) -> list[dict]:
    measured = step_seconds(sizes, steps)
    rows = []
    for n in prompts:
        t = prefill_seconds(n)
        rows.append(res.add("host", what="prefill", prompt=n, block_size=BLOCK_SIZE, step_us=round(t * 1e6, 1),
                            us_per_token=round(t * 1e6 / n, 3)))
    for (s, c), t in measured.items():
        shortest = min(cc for ss, cc in measured if ss == s)
        rows.append(res.add("host", seqs=s, context=c, block_size=BLOCK_SIZE, steps=steps, step_us=round(t * 1e6, 1),
                            vs_shortest=round(t / measured[s, shortest], 2)))
    return rows
