"""A request as the scheduler sees it: its tokens, where its KV lives, and how it ends."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from .sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)  # identity: the scheduler's `in` / remove on lists must not compare token lists
class Sequence:
    prompt: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0        # tokens whose K/V are in the cache
    num_cached_prompt: int = 0   # of those, how many came from the prefix cache at the last admission
    num_prefilled: int = 0       # tokens this sequence computed in prefills, over its life
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)
