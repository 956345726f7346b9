"""The block-padded MoE form against a per-pair float64 loop, and the schedule of MoE forms."""
import pytest
import torch
import torch.nn.functional as F

from export.config import parse_hf_config
from export.model import block_dispatch, rank_in_group
from export.moe_forms import (FORMS, MoeSchedule, ScheduleError, ShardShape, blocks, merge_ranges,
                              modeled_schedule, schedule_scratch)
from export.tiny import PRESETS, hf_config


def loop_reference(x, local, weights, w13, w2):
    """Each (token, choice) pair on its own, in float64: no blocks, no padding, no sorting."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(local.shape[0]):
        for j in range(local.shape[1]):
            e = int(local[t, j])
            y = w13[e].double() @ x[t].double()
            a = F.silu(y[:inter]) * y[inter:]
            out[t] += float(weights[t, j]) * (w2[e].double() @ a)
    return out


@pytest.mark.parametrize("routing", ["random", "one_expert", "few_experts", "masked"])
@pytest.mark.parametrize("T,rows", [(1, 4), (7, 4), (33, 8), (64, 128)])
def test_block_dispatch_matches_a_pair_loop(routing, T, rows):
    E, H, inter, k = 12, 16, 8, 4
    g = torch.Generator().manual_seed(T * 31 + rows)
    x = torch.randn(T, H, generator=g)
    w13, w2 = torch.randn(E, 2 * inter, H, generator=g), torch.randn(E, H, inter, generator=g)
    if routing == "random":
        local = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    elif routing == "one_expert":  # every pair on one expert: the most blocks any expert can need
        local = torch.full((T, k), 5)
    elif routing == "few_experts":
        local = torch.randint(0, 2, (T, k), generator=g) * (E - 1)  # experts 0 and E-1 only
    else:  # expert parallel: other ranks' experts come as id 0 with weight 0
        local = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    if routing == "masked":
        mine = local < E // 2
        weights, local = weights * mine, torch.where(mine, local, torch.zeros_like(local))
    got = block_dispatch(x, local, weights, w13, w2, rows)
    # float32 matmuls against float64: relative 1e-5 of the output's scale covers summation order
    want = loop_reference(x, local, weights, w13, w2)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("P,chunk", [(1, 128), (300, 128), (256, 128), (37, 8)])
def test_rank_in_group_counts_earlier_rows_of_the_same_column(P, chunk):
    cols = torch.randint(0, 5, (P,), generator=torch.Generator().manual_seed(P))
    cols[: P // 2] = 3  # a long run of one column across chunks
    onehot = F.one_hot(cols, 5).float()
    want = [sum(1 for j in range(i) if cols[j] == cols[i]) for i in range(P)]
    assert rank_in_group(onehot, chunk).long().tolist() == want


def _overflow_blocks(per, rows=128):
    return sum(-(-max(c - rows, 0) // rows) for c in per)


def test_block_count_bounds_every_routing():
    """The overflow pass's static block count against the routings that need the most blocks: as
    many experts as the pairs allow just past a block boundary (rows + 1, 2*rows + 1, ...), and all
    pairs on as few experts as possible; exhaustive over all splits for a small case."""
    import itertools

    s = ShardShape(experts=256, inter=192, hidden=3072, top_k=8)
    for T in (1, 16, 17, 31, 32, 33, 129, 2048):
        P = T * 8
        for step in (129, 257, 385):
            n = min(256, P // step)
            per = [step] * n + [0] * (256 - n)
            per[-1] += P - sum(per)
            assert _overflow_blocks(per) <= blocks(s, T), (T, step)
        assert _overflow_blocks([P] + [0] * 255) <= blocks(s, T)
        per = [P // 256 + (e < P % 256) for e in range(256)]
        assert _overflow_blocks(per) <= blocks(s, T)
    small = ShardShape(experts=4, inter=8, hidden=16, top_k=2)
    for T in range(1, 12):
        worst = max(_overflow_blocks(c, rows=3) for c in itertools.product(range(2 * T + 1), repeat=4)
                    if sum(c) == 2 * T)
        assert worst <= blocks(small, T, rows=3), T
    assert blocks(s, 2048) == 2048 * 8 // 128  # 128 blocks: ceil(P / 128) + 256 before the first pass


def test_schedule_spec_pick_and_span():
    s = MoeSchedule.parse("gather:4,dense:16,block", 2048, "given")
    assert s.ranges == (("gather", 4), ("dense", 16), ("block", 2048)) and s.forms == FORMS
    assert [s.pick(t) for t in (1, 4, 5, 16, 17, 2048)] == ["gather"] * 2 + ["dense"] * 2 + ["block"] * 2
    assert s.span("dense") == (5, 16) and s.span("block") == (17, 2048)
    with pytest.raises(ValueError, match="past the export's largest"):
        s.pick(2049)
    assert MoeSchedule.parse("gather:32,block:100000", 2048).ranges == (("gather", 32), ("block", 2048))
    assert MoeSchedule.parse("gather:4000,dense", 2048).ranges == (("gather", 2048),)  # dense gets no tokens
    assert MoeSchedule.parse("gather:8", 2048).ranges == (("gather", 2048),)  # the last form takes the rest
    assert s.upto(10).ranges == (("gather", 4), ("dense", 10))
    assert MoeSchedule.from_json(s.to_json(), "x") == MoeSchedule(s.ranges, "x")
    for bad in ("gather:4,dense:2,block", "gather,block", "gather:4,sparse", "gather:4,gather", "gather:x,block", ""):
        with pytest.raises(ScheduleError):
            MoeSchedule.parse(bad, 2048)


def test_merge_ranges_keeps_one_range_per_form():
    assert merge_ranges([("gather", 3), ("dense", 9), ("gather", 12), ("block", 20)]) == \
        [("gather", 3), ("dense", 12), ("block", 20)]


def test_modeled_schedule_at_real_width():
    """At TP=8 on an A100 (the model): copies of chosen experts only for a few tokens, block-padded
    dispatch for prefill-sized steps, and its scratch far below the dense form's at 2048 tokens."""
    cfg = parse_hf_config(hf_config(PRESETS["real"]))
    s = modeled_schedule(cfg, 8, "intermediate", 2048)
    assert s.pick(1) == "gather" and s.pick(2048) == "block" and "A100" in s.source
    shape = ShardShape.of(cfg, 8, "intermediate")
    dense_only = MoeSchedule((("dense", 2048),))
    assert schedule_scratch(s, shape) < schedule_scratch(dense_only, shape) / 2
