"""The vocabulary-parallel LM head's gather, over real gloo process groups: each rank holds a padded
slice of the logits; rank 0's assembled logits must give what the full logits give."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime.distributed import TorchComm
from runtime.ports import free_port
from runtime.sampling import Sampler, SamplingParams
from runtime.vocab_parallel import VocabGather, candidates_needed

V, N = 10, 6


def full_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g)
    x[0, 2] = x[0, 7] = x[0].max() + 1  # a tie across ranks: the lower id wins
    x[1, 3] = x[1, 4] = x[1].max() + 1  # a tie within a rank
    return x


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = -(-V // world)
    local = torch.full((N, rows), 1e9)  # padding: huge values that must never win
    lo, hi = rank * rows, min(V, (rank + 1) * rows)
    local[:, :hi - lo] = full_logits()[:, lo:hi]
    gather = VocabGather(TorchComm(), V, rows)
    results = {k: gather.finish(local, k) for k in (1, 3, rows + 1, 0)}
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])  # 10 ids: equal slices, and a last slice of 2 (padded to 4)
def test_assembled_logits_sample_as_the_full_ones(world):
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(world, free_port(), out), nprocs=world)
    full = full_logits()
    assert torch.equal(out[0], full)  # everything gathered
    assert out[1].argmax(-1).tolist() == full.argmax(-1).tolist() == [2, 3] + full[2:].argmax(-1).tolist()
    for k in (3, -(-V // world) + 1):  # k beyond a slice's valid ids too
        got = out[k]
        kept = torch.isfinite(got)
        assert torch.equal(got[kept], full[kept])  # candidates carry their true values
        assert (kept.sum(-1) >= k).all()
        # top-k sampling, seeded, from the candidates and from the full logits: the same tokens
        p = [SamplingParams(temperature=0.8, top_k=k, seed=s) for s in range(N)]
        assert Sampler().sample(got, list(range(N)), p) == Sampler().sample(full, list(range(N)), p)


def test_candidates_needed():
    greedy, k40, k5 = SamplingParams(temperature=0), SamplingParams(top_k=40), SamplingParams(top_k=5)
    assert candidates_needed([greedy, greedy]) == 1
    assert candidates_needed([greedy, k40, k5]) == 40
    assert candidates_needed([k5, SamplingParams(top_k=0)]) == 0       # no top-k: full logits
    assert candidates_needed([SamplingParams(top_k=100_000)]) == 0     # more than MAX_CANDIDATES
    assert candidates_needed([]) == 1
