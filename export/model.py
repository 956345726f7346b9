"""The MiniMax-M2 forward pass as traceable pieces that end at the runtime-op boundaries.

Tokens are flattened: every activation is [T, ...] for T tokens of any number of sequences, and
nothing has a data-dependent shape. One decoder layer on one tensor-parallel rank is

    AttnIn   (residual, delta)             -> h, q, k, v, q_ssq, k_ssq   h = residual + delta
      [all-reduce q_ssq, k_ssq]                                            (sums of squares, float32)
    QkRope   (q, k, q_ssq, k_ssq, positions) -> q_rot, k_rot               full-width QK norm, partial RoPE
      [attention(q_rot, k_rot, v) -> attn: paged KV cache, owned by the runtime]
    OProj    (attn)                        -> attn_out                     this rank's partial sum
      [all-reduce attn_out]
    Moe      (h, attn_out)                 -> residual, delta              residual = h + attn_out,
      [all-reduce delta]                                                   delta = this rank's experts

and the next layer's AttnIn (or the Head) adds delta to residual, so a layer boundary is always the
pair (residual, delta). Embed gives the first pair (embeddings, zeros). With TP=1 the all-reduces
are identities and AttnBlock / PostBlock merge the pieces on either side of the attention.

Precision follows the reference: RMSNorm statistics in float32, router logits and sigmoid in
float32, the weighted sum over experts in float32; everything else in the weights' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint, LayerWeights
from .config import ModelConfig
from .moe_forms import BLOCK_ROWS, FORMS as MOE_FORMS
from .sharding import Shard

RANK_CHUNK = 128  # rows a scan of rank_in_group covers: short scans, P / 128 chunks




def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float32) / cfg.rotary_dim))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Neox-style rotation of the first rotary_dim dims of every head. x [T, heads, hd]; cos/sin [T, rotary_dim]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    rot = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([rot, rest], dim=-1)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Embed(nn.Module):
    """Token ids [T] -> the first layer's (residual, delta): the embeddings and zeros."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = _frozen(table)

    def forward(self, ids: torch.Tensor):
        h = self.table.index_select(0, ids)
        return h, torch.zeros_like(h)


class AttnIn(nn.Module):
    """Residual add, input RMSNorm, this rank's q/k/v, and the per-token sums of squares of q and k
    that the full-width QK norm needs from every rank. v goes to the attention as [T, kv_heads, hd]."""

    def __init__(self, w: LayerWeights, cfg: ModelConfig):
        super().__init__()
        self.eps, self.head_dim = cfg.rms_norm_eps, cfg.head_dim
        self.norm = _frozen(w.input_norm)
        # F.linear traces to Gemm(transB=1) on the stored [out, in] weight: no transposed copy.
        self.wq = _frozen(w.q_proj)
        self.wk = _frozen(w.k_proj)
        self.wv = _frozen(w.v_proj)

    def forward(self, residual: torch.Tensor, delta: torch.Tensor):
        h = residual + delta
        x = rms_norm(h, self.norm, self.eps)
        q, k, v = F.linear(x, self.wq), F.linear(x, self.wk), F.linear(x, self.wv)
        q_ssq = q.float().pow(2).sum(-1, keepdim=True)
        k_ssq = k.float().pow(2).sum(-1, keepdim=True)
        return h, q, k, v.reshape(v.shape[0], -1, self.head_dim), q_ssq, k_ssq


class QkRope(nn.Module):
    """Finish the QK norm with the all-reduced sums, then partial neox RoPE.
    Returns q [T, heads_local, hd] and k [T, kv_heads_local, hd]."""

    def __init__(self, w: LayerWeights, cfg: ModelConfig):
        super().__init__()
        self.eps, self.hd, self.rotary_dim = cfg.rms_norm_eps, cfg.head_dim, cfg.rotary_dim
        self.q_width, self.k_width = float(cfg.q_size), float(cfg.kv_size)
        self.q_norm = _frozen(w.q_norm)
        self.k_norm = _frozen(w.k_norm)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, q, k, q_ssq, k_ssq, positions):
        dtype = q.dtype
        q = self.q_norm * (q.float() * torch.rsqrt(q_ssq / self.q_width + self.eps)).to(dtype)
        k = self.k_norm * (k.float() * torch.rsqrt(k_ssq / self.k_width + self.eps)).to(dtype)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        q = apply_rope(q.reshape(q.shape[0], -1, self.hd), cos, sin, self.rotary_dim)
        k = apply_rope(k.reshape(k.shape[0], -1, self.hd), cos, sin, self.rotary_dim)
        return q, k


class OProj(nn.Module):
    def __init__(self, w: LayerWeights):
        super().__init__()
        self.wo = _frozen(w.o_proj)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:  # [T, heads_local * hd] -> [T, H]
        return F.linear(attn, self.wo)


class Moe(nn.Module):
    """Residual add, post-attention RMSNorm, float32 sigmoid router with bias-corrected top-k, and this
    rank's experts, in one of three static-shaped forms (export/moe_forms.py says which runs when):

    - gather: gathers the T*k chosen experts' weights and runs batched matmuls (decode).
    - dense: every expert on every token, combined by a one-hot weight matrix [T, E].
    - block: block-padded dispatch, only the top-k work plus padding (prefill).
    """

    def __init__(self, w: LayerWeights, cfg: ModelConfig, form: str = "gather"):
        super().__init__()
        if form not in MOE_FORMS:
            raise ValueError(f"MoE form {form!r} is not one of {MOE_FORMS}")
        self.form, self.eps, self.top_k = form, cfg.rms_norm_eps, cfg.top_k
        self.num_experts, self.expert_offset = cfg.num_experts, w.expert_offset
        self.norm = _frozen(w.post_norm)
        self.gate = _frozen(w.gate.float())  # [E, H]
        self.bias = _frozen(w.bias.float())
        self.w13 = _frozen(w.w13)
        self.w2 = _frozen(w.w2)

    def route(self, x: torch.Tensor):
        """Top-k expert ids [T, k] (global) and their renormalized float32 weights [T, k]."""
        scores = torch.sigmoid(F.linear(x.float(), self.gate))
        _, idx = torch.topk(scores + self.bias, self.top_k, dim=-1, sorted=True)
        weights = torch.gather(scores, 1, idx)
        return idx, weights / weights.sum(-1, keepdim=True)

    def local_experts(self, idx: torch.Tensor, weights: torch.Tensor):
        """Global expert ids [T, k] -> this rank's (local ids, weights): with expert parallelism the
        other ranks' experts get weight 0 (and id 0)."""
        local = idx - self.expert_offset
        if self.w13.shape[0] != self.num_experts:
            mine = (local >= 0) & (local < self.w13.shape[0])
            weights = weights * mine.float()
            local = torch.where(mine, local, torch.zeros_like(local))
        return local, weights

    def forward(self, h: torch.Tensor, attn_out: torch.Tensor):
        h = h + attn_out
        x = rms_norm(h, self.norm, self.eps)
        idx, weights = self.route(x)
        inter = self.w2.shape[2]
        if self.form != "dense":
            local, weights = self.local_experts(idx, weights)
            if self.form == "block":
                return h, block_dispatch(x, local, weights, self.w13, self.w2).to(h.dtype)
            flat = local.reshape(-1)  # a plain Gather on axis 0 of the stacked experts
            w13 = self.w13.index_select(0, flat).reshape(*local.shape, *self.w13.shape[1:])  # [T, k, 2I, H]
            y = (w13 @ x[:, None, :, None]).squeeze(-1)             # [T, k, 2I]
            a = F.silu(y[..., :inter]) * y[..., inter:]
            w2 = self.w2.index_select(0, flat).reshape(*local.shape, *self.w2.shape[1:])      # [T, k, H, I]
            o = (w2 @ a[..., None]).squeeze(-1)                     # [T, k, H]
            out = (o.float() * weights[..., None]).sum(1)
        else:
            # Token-last layout keeps every MatMul on the stored weights (no transposed copies) and
            # avoids Einsum, which ONNX does not define for BF16.
            n_local = self.w13.shape[0]
            experts = torch.arange(self.expert_offset, self.expert_offset + n_local, device=idx.device)
            onehot = (idx[..., None] == experts).float()            # [T, k, E_local]
            combine = (onehot * weights[..., None]).sum(1)          # [T, E_local]
            y = self.w13 @ x.T[None]                                # [E, 2I, T]
            a = F.silu(y[:, :inter]) * y[:, inter:]                 # [E, I, T]
            o = self.w2 @ a                                         # [E, H, T]
            out = (o.float() * combine.T[:, None, :]).sum(0).T      # [T, H]
        return h, out.to(h.dtype)


def block_dispatch(x: torch.Tensor, local: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, rows: int = BLOCK_ROWS) -> torch.Tensor:
    """The block form: x [T, H], local expert ids [T, k], float32 weights [T, k] -> [T, H] float32.

    Pair p = (token, choice), of rank r among its expert e's pairs, runs in one of two passes:
    - r < rows: slot (e, r) of a [E, rows] grid, one batched matmul over the stored expert weights
      as they are (no copy);
    - r >= rows (an expert with more than `rows` pairs): row r - rows of its overflow, padded to
      blocks of `rows`, each block gathering its expert's weights once. The overflow blocks number at
      most floor((P - 1) / rows) + 1 for P = T*k pairs: n >= 1 overflowing experts take
      sum ceil(o_e / rows) <= (P - n*rows + n*(rows - 1)) / rows <= (P - 1) / rows blocks (one spare
      keeps the pass non-empty). So every shape is a function of T, and the weights gathered are
      those of about P / rows blocks: the earlier single-pass form padded every expert to whole
      blocks, ceil(P / rows) + E of them, each gathered (a copy of every expert and more, per chunk).
    FLOPs are those of (E + P / rows) * rows rows, as before. Unused slots and padding rows compute on
    token 0 and are never read back. Counts and positions are float (exact below 2**24 pairs), so
    every op stays in TensorRT's float support."""
    T, k = local.shape
    E, inter = w13.shape[0], w2.shape[2]
    pairs = T * k
    nb = (pairs - 1) // rows + 1                                               # overflow blocks
    flat = local.reshape(-1)
    onehot = (flat[:, None] == torch.arange(E, device=x.device)).float()       # [P, E]
    rank = rank_in_group(onehot)                                               # [P] among e's pairs
    first = rank < rows                                                        # [P] in pass 1
    pair_ids = torch.arange(pairs, device=x.device)
    # Pass 1: slot e*rows + r; a pair of pass 2 writes to a spare slot of its own past the grid (no
    # index twice: ONNX leaves duplicate ScatterElements indices undefined).
    slot = torch.where(first, flat * rows + rank.long(), E * rows + pair_ids)
    pair_of_slot = torch.zeros(E * rows + pairs, dtype=torch.long, device=x.device).scatter(0, slot, pair_ids)
    xs = x.index_select(0, pair_of_slot[:E * rows] // k).reshape(E, rows, -1)  # [E, B, H]
    # The up projection token-last (the stored [out, in] weights as they are); the down projection's
    # output token-major ([., B, H] = a^T w2^T), so its rows are gathered back without a transposed
    # copy of [., H, B] (0.95 ms at 2048 tokens on an H200, as PyTorch ops).
    y = w13 @ xs.transpose(1, 2)                                               # [E, 2I, B]
    a = F.silu(y[:, :inter]) * y[:, inter:]
    o1 = a.transpose(1, 2) @ w2.transpose(1, 2)                                # [E, B, H]
    # Pass 2: each expert's overflow o_e = count - rows (if positive), padded to whole blocks.
    over = torch.relu(onehot.sum(0) - rows)                                    # [E]
    padded = torch.ceil(over / rows) * rows
    ends = padded.cumsum(0)
    # [P] its row in pass 2 (meaningless for pass 1's pairs: every use below selects them out)
    row = ((ends - padded).index_select(0, flat) + rank - rows).long()
    # Pass 1's pairs write to spare rows of their own past the blocks.
    pair_of_row = torch.zeros(nb * rows + pairs, dtype=torch.long, device=x.device).scatter(
        0, torch.where(first, nb * rows + pair_ids, row), pair_ids)
    starts = torch.arange(nb, device=x.device).float() * rows
    # Blocks past the last used one -> E-1 (their rows are never read). Min, not Clip.
    last = torch.full((), E - 1, dtype=torch.float32, device=x.device)
    expert_of_block = torch.minimum((ends[None, :] <= starts[:, None]).float().sum(1), last).long()
    xb = x.index_select(0, pair_of_row[:nb * rows] // k).reshape(nb, rows, -1)  # [NB, B, H]
    y = w13.index_select(0, expert_of_block) @ xb.transpose(1, 2)             # [NB, 2I, B]
    a = F.silu(y[:, :inter]) * y[:, inter:]
    o2 = a.transpose(1, 2) @ w2.index_select(0, expert_of_block).transpose(1, 2)  # [NB, B, H]
    out_rows = torch.cat([o1.reshape(E * rows, -1), o2.reshape(nb * rows, -1)])
    where = torch.where(first, slot, E * rows + row)
    o = out_rows.index_select(0, where).reshape(T, k, -1)
    return (o.float() * weights[..., None]).sum(1)


def rank_in_group(onehot: torch.Tensor, chunk: int = RANK_CHUNK) -> torch.Tensor:
    """onehot [P, E] (float, one 1 a row) -> [P]: how many earlier rows have the same column.

    A CumSum down all P rows scans one long axis per column (E lanes of P steps: 3 ms of a 6 ms block
    form at 2048 tokens on an H200, as PyTorch ops); here the rows are cut into chunks of `chunk`: a
    scan within each chunk, then one over the chunks' totals, each short and P*E/chunk lanes wide.
    Exact: the counts stay integers below 2**24 in float32."""
    P, E = onehot.shape
    # No branch on P: the ONNX graph serves a range of token counts (its shapes are symbolic), so
    # the rows are always padded (a Concat with 0..chunk-1 zero rows; Pad is outside TensorRT's ONNX
    # support list) and chunk is fixed.
    c = chunk
    n = (P + c - 1) // c
    padded = torch.cat([onehot, onehot.new_zeros(n * c - P, E)]).reshape(n, c, E)  # [N, C, E]
    within = padded.cumsum(1)                                                   # [N, C, E]
    totals = within[:, -1, :]                                                   # [N, E]
    before = totals.cumsum(0) - totals                                          # earlier chunks' counts
    ranks = ((within + before[:, None, :]) * padded).sum(2) - 1                 # [N, C]
    return ranks.reshape(-1)[:P]


class Head(nn.Module):
    """Final norm and the LM head: logits [T, rows] float32 of the rows it holds (with TP, one rank's
    slice of the vocabulary)."""

    def __init__(self, norm: torch.Tensor, lm_head: torch.Tensor, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.norm = _frozen(norm)
        self.lm_head = _frozen(lm_head)

    def forward(self, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:  # -> [T, V] float32
        return F.linear(rms_norm(residual + delta, self.norm, self.eps), self.lm_head).float()


class AttnBlock(nn.Module):
    """TP=1: AttnIn and QkRope in one graph (no all-reduce between them)."""

    def __init__(self, w: LayerWeights, cfg: ModelConfig):
        super().__init__()
        self.attn_in, self.qk_rope = AttnIn(w, cfg), QkRope(w, cfg)

    def forward(self, residual, delta, positions):
        h, q, k, v, q_ssq, k_ssq = self.attn_in(residual, delta)
        q, k = self.qk_rope(q, k, q_ssq, k_ssq, positions)
        return h, q, k, v


class PostBlock(nn.Module):
    """TP=1: OProj and Moe in one graph."""

    def __init__(self, w: LayerWeights, cfg: ModelConfig, form: str):
        super().__init__()
        self.o_proj, self.moe = OProj(w), Moe(w, cfg, form)

    def forward(self, h, attn):
        return self.moe(h, self.o_proj(attn))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Plain causal GQA attention of packed sequences, no cache: the stand-in for the runtime op.
    q [T, Hq, hd], k/v [T, Hkv, hd] -> [T, Hq * hd]."""
    out, start = [], 0
    for n in seq_lens:
        qs, ks, vs = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        out.append(o[0].transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(out, 0)


class RankLayer:
    """One layer's pieces on one rank."""

    def __init__(self, w: LayerWeights, cfg: ModelConfig, moe_form: str):
        self.attn_in, self.qk_rope = AttnIn(w, cfg), QkRope(w, cfg)
        self.o_proj, self.moe = OProj(w), Moe(w, cfg, moe_form)


class Model:
    """The whole model for greedy generation without a KV cache. With tp > 1 it holds every rank's
    slice and sums their partial outputs where the runtime would all-reduce: the same pieces, in
    one process."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32, moe_form: str = "gather",
                 tp: int = 1, expert_split: str = "intermediate", progress: bool = False):
        self.cfg = cfg = ckpt.config
        shards = [Shard(tp, r, expert_split) for r in range(tp)]
        shards[0].check(cfg)
        g = ckpt.globals(dtype)
        self.embed, self.head = Embed(g.embed), Head(g.norm, g.lm_head, cfg)
        layers = range(cfg.num_hidden_layers)
        if progress:
            from tqdm import tqdm
            layers = tqdm(layers, desc="loading layers", unit="layer")
        self.layers = [[RankLayer(ckpt.layer(n, dtype, s), cfg, moe_form) for s in shards] for n in layers]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, seq_lens: list[int] | None = None) -> torch.Tensor:
        """Logits [T, V] for packed sequences `ids` [T] (one sequence if seq_lens is None)."""
        seq_lens = seq_lens or [ids.numel()]
        positions = torch.cat([torch.arange(n) for n in seq_lens])
        residual, delta = self.embed(ids)
        for ranks in self.layers:
            outs = [r.attn_in(residual, delta) for r in ranks]
            h = outs[0][0]
            q_ssq = sum(o[4] for o in outs)  # all-reduce
            k_ssq = sum(o[5] for o in outs)
            attn_out = 0
            for r, (_, q, k, v, _, _) in zip(ranks, outs):
                q, k = r.qk_rope(q, k, q_ssq, k_ssq, positions)
                attn_out = attn_out + r.o_proj(causal_attention(q, k, v, seq_lens))  # all-reduce
            moe = [r.moe(h, attn_out) for r in ranks]
            residual, delta = moe[0][0], sum(m[1] for m in moe)  # all-reduce
        return self.head(residual, delta)

    def generate(self, ids: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        seq, out = list(ids), []
        for _ in range(max_new_tokens):
            nxt = int(self.logits(torch.tensor(seq))[-1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if stop_at_eos and nxt in self.cfg.eos_token_ids:
                break
        return out
