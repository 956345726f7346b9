"""A scheduled batch as the executor's inputs: packed token ids, positions, the slot of each new
token, the rows to sample, and the attention metadata. The work is per new token (and per sequence),
never per context token: the tokens are read from each sequence's token list by slice, and the block
tables go as rows updated in place (runtime/block_tables.py)."""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from .attention import AttentionMetadata
from .block_manager import BlockManager
from .block_tables import TableRows
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class StepInputs:
    ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # the last new token of each sequence
    prefill_tokens: int
    decode_tokens: int
    # rows of `ids` holding a pending token (0 here; its value is on the device, from the step in
    # flight: runtime/llm_engine.py), and their sequences
    carried_rows: list[int] = field(default_factory=list)
    carried_seqs: list[Sequence] = field(default_factory=list)


def _block_slots(table: list[int], start: int, n: int, bs: int) -> list[int]:
    """The cache slots of positions start..start+n-1: a range per block (a prompt chunk's thousands of
    positions cost a few hundred range extends, not a Python expression each)."""
    out: list[int] = []
    p, end = start, start + n
    while p < end:
        b = p // bs
        stop = min(end, (b + 1) * bs)
        base = table[b] * bs - b * bs
        out.extend(range(base + p, base + stop))
        p = stop
    return out


def _tensor(values) -> torch.Tensor:
    """An int64 CPU tensor of a list: through array's C conversion, about 7x faster than torch.tensor
    of a list at a prompt chunk's sizes (the copy detaches it from the array's buffer)."""
    if not values:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array("q", values), dtype=torch.int64).clone()


def build_step(batch: ScheduledBatch, block_size: int, rows: TableRows) -> StepInputs:
    ids, positions, slots, last = [], [], [], []
    ctx_lens = []
    carried_rows, carried_seqs = [], []
    prefill = decode = 0
    bs = block_size
    for seq, n in zip(batch.seqs, batch.num_new):
        start = seq.num_computed
        if seq.pending:  # decoding its pending token (the scheduler gives such a sequence one token)
            assert n == 1 and start == len(seq.tokens), f"{seq}: a pending token is decoded alone"
            carried_rows.append(len(ids))
            carried_seqs.append(seq)
            ids.append(0)
        else:
            ids += seq.tokens[start:start + n]
        positions += range(start, start + n)
        slots += _block_slots(seq.block_table, start, n, bs)
        last.append(len(ids) - 1)
        ctx_lens.append(start + n)
        if n > 1 or not (seq.output or seq.pending):
            prefill += n
            seq.num_prefilled += n
        else:
            decode += n
    meta = AttentionMetadata(_tensor(slots), list(batch.num_new), ctx_lens, rows.delta(batch.seqs))
    return StepInputs(_tensor(ids), _tensor(positions), meta, _tensor(last), prefill, decode, carried_rows,
                      carried_seqs)


def record_computed(batch: ScheduledBatch, blocks: BlockManager) -> None:
    """After the step ran: its tokens are in the cache; the blocks they filled join the prefix cache."""
    for seq, n in zip(batch.seqs, batch.num_new):
        seq.num_computed += n
        blocks.cache_full_blocks(seq)
