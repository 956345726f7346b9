"""A request as the scheduler sees it: its tokens, where its KV lives, and how it ends."""
from __future__ import annotations

import itertools
from enum import Enum

from .sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Output(list):
    """The generated tokens. Appending also appends to the sequence's token list, so that list
    (prompt then output) is never rebuilt: a step reads its new tokens from it in O(step)."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: list[int]):
        super().__init__()
        self._tokens = tokens

    def append(self, token: int) -> None:
        super().append(token)
        self._tokens.append(token)

    def extend(self, tokens) -> None:
        tokens = list(tokens)
        super().extend(tokens)
        self._tokens.extend(tokens)

    def __iadd__(self, tokens):
        self.extend(tokens)
        return self

    def _read_only(self, *_a, **_k):
        raise TypeError("a sequence's output only grows (append, extend)")

    __setitem__ = __delitem__ = insert = pop = remove = clear = sort = reverse = _read_only


class Sequence:
    """Compared by identity: the scheduler's `in` / remove on lists must not compare token lists."""

    def __init__(self, prompt: list[int], params: SamplingParams):
        self.tokens: list[int] = list(prompt)  # prompt then output, appended to: the one record of both
        self.num_prompt = len(self.tokens)
        self.params = params
        self.id = next(_ids)
        self.output = Output(self.tokens)
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0        # tokens whose K/V are in the cache
        # tokens sampled on the device whose values the host does not have yet (async scheduling,
        # runtime/llm_engine.py): they count in len() (the scheduler gives them slots and steps) but
        # are not in `tokens` until their step completes
        self.pending = 0
        self.num_cached_prompt = 0   # of those, how many came from the prefix cache at the last admission
        self.num_prefilled = 0       # tokens this sequence computed in prefills, over its life
        self.finish_reason: str | None = None
        self.constraint = None  # a grammar's matcher (runtime/constrained.py), or None: free text
        # prefix-cache bookkeeping (runtime/block_manager.py): the leading blocks of block_table
        # registered so far, and the chained hash of the last of them
        self.num_hashed = 0
        self.last_hash: bytes | None = None

    @property
    def prompt(self) -> list[int]:
        """A copy (O(prompt)): for reports, not for per-step work."""
        return self.tokens[:self.num_prompt]

    def __len__(self) -> int:
        """Tokens known and pending: what the scheduler and the block manager count."""
        return len(self.tokens) + self.pending

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, prompt={self.num_prompt} tokens, output={len(self.output)} tokens, "
                f"{self.status.value}, computed={self.num_computed}" + (f", pending={self.pending}" if self.pending else "")
                + ")")
