"""Block tables kept on each rank's device as rows of one array, updated where they changed.

A step's sequences each hold a row; rank 0 sends the rows of the step and the (row, column, block)
entries written since the last step: a decode step writes a block id only when a sequence enters a
new block, so what a step sends and sets does not grow with the context. Each rank sets those entries
in its array and gathers the step's rows on its device, which gives the same zero-padded [S, M]
table that the attention kernels read (entries past a sequence's table are 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .host_copy import to_device
from .sequence import Sequence, Status


@dataclass
class TableDelta:
    """What a step sends of its block tables."""
    rows: list[int]      # the row of each sequence of the step, in packing order
    width: int           # the longest block table among them (the padded table's width)
    written: tuple[list[int], list[int], list[int]]  # (rows, columns, blocks) set since the last step


class TableRows:
    """Rank 0: which row each running sequence holds, and how much of its block table the rows have.
    A sequence keeps its row while it runs; a row whose sequence stopped running is taken back when
    a new sequence needs one (running sequences never outnumber max_num_seqs, so rows stay few)."""

    def __init__(self):
        self.row_of: dict[int, int] = {}       # sequence id -> row
        self.holder: list[Sequence | None] = []
        self.table: list[list[int] | None] = []  # the block-table list the row mirrors (identity)
        self.synced: list[int] = []            # entries of the row set (the rest are 0)
        self.free: list[int] = []

    def delta(self, seqs: list[Sequence]) -> TableDelta:
        rows, r, c, v = [], [], [], []
        width = 0
        for seq in seqs:
            table = seq.block_table
            row = self.row_of.get(seq.id)
            if row is None:
                row = self._take(seq)
            if self.table[row] is not table:  # a new holder, or re-admitted after a preemption
                old = self.synced[row]
                self.table[row], self.synced[row] = table, 0
                if old > len(table):  # clear what the row's last table left past this one
                    r += [row] * (old - len(table))
                    c += range(len(table), old)
                    v += [0] * (old - len(table))
            k, n = self.synced[row], len(table)
            if n > k:
                r += [row] * (n - k)
                c += range(k, n)
                v += table[k:n]
                self.synced[row] = n
            rows.append(row)
            width = max(width, n)
        return TableDelta(rows, width, (r, c, v))

    def _take(self, seq: Sequence) -> int:
        if not self.free:
            for row, s in enumerate(self.holder):
                if s is not None and s.status is not Status.RUNNING:
                    del self.row_of[s.id]
                    self.holder[row] = None
                    self.free.append(row)
        if self.free:
            row = self.free.pop()
        else:
            row = len(self.holder)
            self.holder.append(None)
            self.table.append(None)
            self.synced.append(0)
        self.holder[row] = seq
        self.row_of[seq.id] = row
        return row


class DeviceTables:
    """Each rank: the rows on its device (int32, grown by doubling as rows and columns come)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.t = torch.zeros((0, 0), dtype=torch.int32, device=self.device)

    def _fit(self, rows: int, cols: int) -> None:
        R, C = self.t.shape
        if rows <= R and cols <= C:
            return
        grown = torch.zeros((max(rows, 2 * R) if rows > R else R, max(cols, 2 * C) if cols > C else C),
                            dtype=torch.int32, device=self.device)
        grown[:R, :C] = self.t
        self.t = grown

    def apply(self, d: TableDelta) -> torch.Tensor:
        """Set the step's written entries; its block tables [S, width] (int32, on the device)."""
        r, c, v = d.written
        self._fit(max(max(d.rows), max(r, default=-1)) + 1, max(d.width, max(c, default=-1) + 1))
        n = len(d.rows)
        # one copy (pinned: it does not wait for a step still running): the step's rows, then the entries
        packed = to_device(torch.tensor(d.rows + r + c + v, dtype=torch.int64), self.device)
        if r:
            k = len(r)
            self.t[packed[n:n + k], packed[n + k:n + 2 * k]] = packed[n + 2 * k:].to(torch.int32)
        return self.t[:, :d.width].index_select(0, packed[:n])
