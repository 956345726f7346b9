"""Runs an export's steps for one rank: subgraphs on a backend, runtime ops (all-reduce, broadcast,
attention) in between, on one table of named tensors."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from export.manifest import AllReduceStep, AttentionStep, BroadcastStep, Manifest, SubgraphStep

from . import profile_ranges
from .attention import AttentionMetadata, paged_attention, paged_decode_attention
from .block_tables import DeviceTables, TableDelta
from .dispatch import NONE, Dispatch, StepPlan, step_layers
from .host_copy import set_rows, to_device
from .kv_cache import KVCache
from .vocab_parallel import StepExtras, VocabGather

log = logging.getLogger(__name__)


class SingleRank:
    """Collectives of a one-rank run: identities. The tensor-parallel runtime swaps in torch.distributed
    (runtime/distributed.py)."""
    rank, world = 0, 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor | None, src: int, like: torch.Tensor | None = None) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return t[None]

    def share_step(self, payload):
        return payload


@dataclass
class Carried:
    """A step's ids that are on the device already (async scheduling: tokens the step in flight
    sampled): `rows` of the step's ids take `tokens` [len(rows)] int64 (rank 0's; sent to the other
    ranks with one broadcast on the device, None in what they are sent)."""
    rows: list[int]
    tokens: torch.Tensor | None = None

    def into(self, ids: torch.Tensor, dev) -> torch.Tensor:
        """The step's ids on the device with these rows set (the caller's tensor unchanged)."""
        out = to_device(ids, dev)
        out = out.clone() if out is ids else out
        set_rows(out, self.rows, self.tokens)
        return out


@dataclass(frozen=True)
class DecodeSettings:
    """Fixed-size decode steps (runtime/cuda_graphs.py): bucket sizes up to max_num_seqs, block
    tables up to max_blocks, padding rows writing into padding_block, replayed from CUDA graphs or
    run eagerly."""
    max_num_seqs: int
    max_blocks: int
    padding_block: int
    use_graphs: bool


@dataclass(frozen=True)
class PrefillSettings:
    """One sequence's prefill chunks padded to bucket sizes up to max_tokens (runtime/prefill_graphs.py),
    for sequences up to max_blocks blocks, padding rows writing into the decode steps' padding_block;
    made only where CUDA graphs are on."""
    max_tokens: int
    max_blocks: int
    padding_block: int


class StepExecutor:
    def __init__(self, manifest: Manifest, backend, kv: KVCache, rank: int = 0, comm=None,
                 decode: DecodeSettings | None = None, prefill: PrefillSettings | None = None):
        self.manifest, self.backend, self.kv, self.rank = manifest, backend, kv, rank
        self.comm = comm or SingleRank()
        self.kernels = getattr(backend, "kernels", NONE)
        self.dispatch = Dispatch(manifest.moe, self.kernels)  # what runs at a step size
        self.decode_layers = getattr(backend, "decode_layers", {})
        self.hidden = manifest.config.hidden_size
        self.last_ran = ""  # what the last step ran (StepPlan.ran, for stats)
        self.last_logprobs = None  # rank 0's LogprobStats of the last step that asked for them
        self._step_layer = step_layers(manifest)
        head = manifest.subgraphs["head"].outputs[0]
        self.vocab = VocabGather(self.comm, manifest.config.vocab_size, head.shape[-1])
        self.tables = DeviceTables(backend.device)  # every rank's block tables, updated as each step says
        self.decode_graphs = None
        if decode is not None:
            from .cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(self, decode.max_num_seqs, decode.max_blocks, decode.padding_block,
                                              decode.use_graphs)
        self.prefill_graphs = None
        if prefill is not None:
            from .prefill_graphs import PrefillGraphs

            self.prefill_graphs = PrefillGraphs(self, prefill.max_tokens, prefill.max_blocks, prefill.padding_block)
        self._pool = None

    def graph_pool(self):
        """The memory pool every captured graph of this rank shares (they never run at once)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            logits_rows: torch.Tensor, candidates: int = 0, extras: StepExtras | None = None,
            carried: Carried | None = None) -> torch.Tensor | None:
        """One forward step over packed tokens; returns float32 logits [len(logits_rows), V] on rank 0.
        Rank 0 first sends the step's metadata to the other ranks, which run the same step.
        candidates: what sampling needs of each rank's vocabulary slice (runtime/vocab_parallel.py):
        1 greedy, k the top k, 0 everything; entries not sent are -inf. extras: grammar masks and
        logprobs (`last_logprobs` then holds rank 0's LogprobStats). carried: ids already on the
        device (rows of `ids` that hold 0 here)."""
        if self.comm.world > 1:
            sent = None if carried is None else Carried(carried.rows)
            self.comm.share_step((ids, positions, meta, logits_rows, candidates, extras, sent))
        return self._run(ids, positions, meta, logits_rows, candidates, extras, carried)

    def serve(self) -> None:
        """The loop of ranks other than 0: run each step rank 0 sends, until it sends None."""
        while (step := self.comm.share_step(None)) is not None:
            self._run(*step)
        self.close()

    def close(self) -> None:
        """Release captured CUDA graphs: they hold NCCL work, and must go before the process group."""
        for graphs in (self.decode_graphs, self.prefill_graphs):
            if graphs is not None:
                graphs.clear()
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)

    def _carried(self, carried: Carried | None) -> Carried | None:
        """A step's carried ids with their values on this rank's device: rank 0's tokens, which every
        other rank gets from one broadcast (no host sync)."""
        if carried is None or self.comm.world == 1:
            return carried
        dev = self.backend.device
        like = torch.empty(len(carried.rows), dtype=torch.int64, device=dev)
        return Carried(carried.rows, self.comm.broadcast(carried.tokens, 0, like))

    def _run(self, ids, positions, meta, logits_rows, candidates=0, extras=None, carried=None):
        dev = self.backend.device
        carried = self._carried(carried)
        tables = meta.block_tables
        if isinstance(tables, TableDelta):
            tables = self.tables.apply(tables)
        elif not isinstance(tables, torch.Tensor):  # lists (benchmarks): zero-padded here
            width = max(len(t) for t in tables)
            tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        decoding = max(meta.q_lens) == 1
        if self.decode_graphs is not None and self.decode_graphs.can_run(meta.q_lens, tables.shape[1]):
            self.last_ran = self.dispatch.plan(self.decode_graphs.bucket(len(meta.q_lens)), True).ran
            local = self._without_graphs(self.decode_graphs.run, ids, positions, meta.slot_mapping, meta.q_lens,
                                         meta.context_lens, tables, carried)
        elif self.prefill_graphs is not None and self.prefill_graphs.can_run(meta.q_lens, tables.shape[1]):
            self.last_ran = self.dispatch.plan(self.prefill_graphs.bucket(meta.q_lens[0]), False).ran
            local = self._without_graphs(self.prefill_graphs.run, ids if carried is None else carried.into(ids, dev),
                                         positions, meta.slot_mapping, meta.context_lens[0], tables)
        else:
            ids = ids if carried is None else carried.into(ids, dev)
            meta = AttentionMetadata(meta.slot_mapping.to(dev), meta.q_lens, meta.context_lens, tables)
            decode = None
            if decoding and self.decode_layers:  # a decode step past the graphs' limits: the same layers, eager
                t, _, _, ctx = meta.on_device(dev)
                decode = (meta.slot_mapping, t, ctx)
            plan = self.dispatch.plan(ids.numel(), decoding)
            self.last_ran = plan.ran
            local = self.forward(ids.to(dev), positions.to(dev), logits_rows.to(dev), meta=meta, decode=decode,
                                 plan=plan)
        self.last_logprobs = None
        if extras is not None:  # raw logprobs first, then the grammar's mask (runtime/vocab_parallel.py)
            if extras.top_logprobs is not None:
                self.last_logprobs = self.vocab.logprob_stats(local, extras.top_logprobs)
            if extras.mask_rows:
                local = self.vocab.apply_mask(local, extras.mask_rows, extras.mask)
        return self.vocab.finish(local, candidates)

    def _without_graphs(self, run, *args):
        """run(*args) (a graphs object's run); if its capture fails, every graph of this rank is
        turned off and the step runs again as the same padded steps eagerly (the capture executed
        nothing; the warm-up before it ran the step once, and the rerun writes the same K/V again).
        Captures happen on first use of a shape, so this can be in the middle of serving: the
        requests go on, slower, rather than fail; the process should be restarted (CaptureError)."""
        from .cuda_graphs import CaptureError

        try:
            return run(*args)
        except CaptureError as e:
            log.error("CUDA graph capture failed; this rank runs every step eagerly from now on. Restart the "
                      "server (--no-prefill-graphs keeps prefill eager, --no-cuda-graphs everything): %s", e)
            for graphs in (self.decode_graphs, self.prefill_graphs):
                if graphs is not None:
                    graphs.use_graphs = False
            return run(*args)

    def forward(self, ids, positions, logits_rows, meta: AttentionMetadata | None = None, decode=None,
                plan: StepPlan | None = None):
        """The manifest's steps on device tensors. Attention through `meta` (any batch), or for a
        decode batch of fixed shape through `decode` = (slot_mapping, block_tables, context_lens)
        tensors, which is what a CUDA graph captures. `plan` (runtime/dispatch.py; by default from the
        step's size) says whether the layers run as decode layers, and the MoE's kernel."""
        dev = self.backend.device
        env = {"ids": ids, "positions": positions}
        if plan is None:
            plan = self.dispatch.plan(ids.numel(), decode is not None)
        form = plan.form
        layers = self.decode_layers if plan.decode_layer and decode is not None else None
        done = None
        for i, step in enumerate(self.manifest.steps):
            n = self._step_layer[i]
            if layers is not None and n is not None:
                if n != done:  # the layer's steps, as one decode layer
                    env["residual"], env["delta"] = layers[n](env["residual"], env["delta"], positions, *decode,
                                                              self.kv.k[n], self.kv.v[n], self.comm)
                    done = n
                continue
            if isinstance(step, SubgraphStep):
                name = step.pick(form)
                sg = self.manifest.subgraphs[name]
                if self.rank not in sg.ranks:
                    continue
                inputs = {t.name: env[t.name] for t in sg.inputs}
                if name == "head":  # logits only where a token is sampled
                    inputs = {k: v.index_select(0, logits_rows) for k, v in inputs.items()}
                if self.kernels.moe_kernels:
                    env.update(self.backend.run(name, inputs, plan))
                else:
                    env.update(self.backend.run(name, inputs))
            elif isinstance(step, AllReduceStep):
                for t in step.tensors:
                    env[t] = self.comm.all_reduce(env[t])
            elif isinstance(step, BroadcastStep):
                shape = (ids.numel(), self.hidden)
                for t in step.tensors:
                    like = torch.empty(shape, dtype=self.backend.dtype, device=dev)
                    env[t] = self.comm.broadcast(env.get(t), step.src, like)
            elif isinstance(step, AttentionStep):
                n, q, k, v = step.layer, env[step.q], env[step.k], env[step.v]
                with profile_ranges.span(profile_ranges.ATTENTION):
                    if decode is not None:
                        env[step.out] = paged_decode_attention(q, k, v, self.kv.k[n], self.kv.v[n], *decode,
                                                               step.scale)
                    else:
                        env[step.out] = paged_attention(q, k, v, self.kv.k[n], self.kv.v[n], meta, step.scale)
            else:
                raise ValueError(f"unknown step {step!r} in the manifest")
        return env["logits"]  # this rank's vocabulary slice
