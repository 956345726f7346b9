"""The LLM engine: requests in, tokens out. Owns the block manager, the scheduler and the sampler;
runs each scheduled batch through rank 0's step executor (which sends it to the other ranks)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from export.config import note_missing_eos
from export.manifest import Manifest, ManifestError, find_manifest
from export.text_config import GenerationDefaults

import torch

from .block_manager import BlockManager
from .block_tables import TableRows
from .config import EngineConfig
from .constrained import Grammars, bitmask
from .executor import Carried
from .host_copy import rows_index
from .rank import build_rank
from .sampling import FAILURES, Sampler, SamplingParams, on_device, sample_on_device
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, Status
from .step_inputs import build_step, record_computed
from .text import TextCodec
from .validation import Limits, RequestError, out_of_vocabulary
from .vocab_parallel import StepExtras, candidates_needed

__all__ = ["LLMEngine", "RequestError", "StepOutput"]


@dataclass
class StepOutput:
    """One sequence's result of a step: its new token, or (token None) the error that ended it alone."""
    seq: Sequence
    token: int | None
    finished: bool
    error: str | None = None
    logprob: float | None = None                          # with params.logprobs: the token's raw logprob
    top_logprobs: list[tuple[int, float]] | None = None   # and the params.logprobs most likely (id, logprob)


@dataclass
class Stats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    forward_seconds: float = 0.0
    forms: dict = field(default_factory=dict)
    extras_steps: int = 0         # steps that sent grammar masks or asked for logprobs (StepExtras)
    mask_seconds: float = 0.0     # host time building them (filling the grammar masks)
    overlapped_steps: int = 0     # steps launched while the previous step's tokens were still on the device


def _rows(logits: torch.Tensor, done: list[int], n: int) -> torch.Tensor:
    """The logits of the rows that sample (all n rows: no copy)."""
    return logits[done] if len(done) < n else logits


@dataclass
class InFlight:
    """A launched step whose tokens (sampled there) are still on the device (async scheduling): the next step
    reads them there (`pick`), and the host gets them from a copy started at launch (`on_host`)."""
    batch: ScheduledBatch
    done: list[int]                  # the batch rows that sampled
    tokens: torch.Tensor             # [len(done)] int64, on the logits' device
    host: torch.Tensor               # [2, len(done)] int64: the tokens and each row's status (sampling.FAILURES)
    ready: torch.cuda.Event | None   # the copy to `host` done (None: it was made synchronously)
    row_of: dict[int, int]           # sequence id -> index into tokens

    @classmethod
    def launch(cls, batch: ScheduledBatch, done: list[int], rows: torch.Tensor) -> "InFlight":
        """rows: the logits of the `done` rows."""
        first, status = sample_on_device(rows, [batch.seqs[i].params for i in done])
        packed = torch.stack([first, status])
        ready = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = packed
        for i in done:
            batch.seqs[i].pending += 1
        return cls(batch, done, first, host, ready, {batch.seqs[i].id: j for j, i in enumerate(done)})

    def pick(self, src: list[int]) -> torch.Tensor:
        """tokens[src] on the device (no host sync; a view when src is 0..n-1)."""
        return self.tokens[rows_index(src, self.tokens.device)]

    def on_host(self) -> tuple[list[int], list[int]]:
        if self.ready is not None:
            self.ready.synchronize()
        toks, status = self.host.tolist()
        return toks, status


class LLMEngine:
    """Rank 0 of a run. With an export for TP > 1, pass the communicator of an already started group
    (runtime/distributed.py starts one: `LLMEngine.start`)."""

    def __init__(self, model: str | Path, config: EngineConfig | None = None, comm=None, backend=None):
        self.config = c = config or EngineConfig()
        self.manifest = Manifest.load(find_manifest(model))
        if self.manifest.tp > 1 and (comm is None or comm.world != self.manifest.tp):
            raise ManifestError(f"this export is for TP={self.manifest.tp}; start it with LLMEngine.start "
                                "(one process per rank) or under torchrun")
        self.model_config = cfg = self.manifest.config
        self.codec = TextCodec.load(self.manifest.root)  # None without tokenizer.json: ids in, ids out
        self.generation_defaults = GenerationDefaults.read(self.manifest.root)
        note_missing_eos(cfg)
        self.executor = build_rank(self.manifest, c, 0, comm, backend)
        self.backend, self.kv = self.executor.backend, self.executor.kv
        self.blocks = BlockManager(self.kv.num_blocks, c.block_size, reserve_padding=self.executor.decode_graphs is not None)
        self.max_num_batched_tokens = c.max_num_batched_tokens or self.manifest.max_tokens
        self.max_model_len = min(c.max_model_len or cfg.max_position_embeddings, self.blocks.num_usable * c.block_size)
        self.scheduler = Scheduler(self.blocks, c.max_num_seqs, self.max_num_batched_tokens, self.max_model_len)
        self.table_rows = TableRows()  # the block tables as rows on each rank's device
        self.sampler = Sampler()
        self.stats = Stats()
        self._group = None
        self._grammars = None
        self._inflight: InFlight | None = None  # async scheduling: the launched step whose tokens are on the device
        self.async_scheduling = c.async_scheduling if c.async_scheduling is not None else \
            self.backend.device.type == "cuda"

    @classmethod
    def start(cls, model: str | Path, config: EngineConfig | None = None) -> "LLMEngine":
        """An engine for any export: one process when TP=1; with TP > 1, this process is rank 0 and
        the other ranks are started (or joined, under torchrun)."""
        manifest = Manifest.load(find_manifest(model))
        if manifest.tp == 1:
            return cls(model, config)
        from .distributed import start_group

        config = config or EngineConfig()
        group = start_group(find_manifest(model), config, manifest.tp)
        try:
            engine = cls(model, config, group.comm)
        except BaseException:
            group.abort()  # the other ranks may be loading or blocked in a collective: none outlives this
            raise
        engine._group = group
        return engine

    def stall_report(self) -> str:
        """What the other ranks are doing, for a step that does not return (a hung rank)."""
        if self._group is None:
            return "no other rank in this process's group" if self.manifest.tp == 1 else \
                "the other ranks were started outside this process (torchrun): check them"
        return self._group.stall_report()

    def on_rank_lost(self, handler) -> None:
        """handler(message) is called when another rank dies, instead of this process exiting at once."""
        if self._group is not None:
            self._group.on_lost = handler

    def kill_ranks(self) -> None:
        """End the other ranks at once (a dead engine: they may be blocked in a collective)."""
        if self._group is not None:
            self._group.kill()

    def close(self) -> None:
        """Stop the other ranks (if any) and wait for them."""
        if self._group is not None:
            self._group.stop(before_destroy=self.executor.close)
            self._group = None
        else:
            self.executor.close()

    # ---- requests -----------------------------------------------------------------------------
    def sampling_params(self, temperature: float | None = None, top_p: float | None = None,
                        top_k: int | None = None, **given) -> SamplingParams:
        """Parameters for a request: what it leaves unset comes from the model's generation_config.json."""
        return SamplingParams.with_defaults(self.generation_defaults, temperature, top_p, top_k, **given)

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, constraint=None) -> Sequence:
        """Validate and queue one request (params None: the model's defaults); a bad one raises
        RequestError and changes nothing. constraint: a grammar's matcher for this request
        (runtime/constrained.py, from `grammars`)."""
        params = params or self.sampling_params()
        self.check_request(prompt, params)
        seq = Sequence(prompt, params)  # copies the prompt
        seq.constraint = constraint
        self.scheduler.add(seq)
        return seq

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler for this model's vocabulary (built on first use; needs a tokenizer)."""
        if self._grammars is None:
            if self.codec is None:
                raise RequestError("constrained decoding needs the model's tokenizer.json")
            self._grammars = Grammars(self.codec, self.model_config.vocab_size, self.model_config.eos_token_ids)
        return self._grammars

    @property
    def limits(self) -> Limits:
        """What requests must fit (runtime/validation.py checks them against it)."""
        return Limits(self.model_config.vocab_size, self.max_model_len)

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """RequestError naming what makes this request impossible (reads settings only: any thread)."""
        vocab = self.model_config.vocab_size
        if not prompt:
            raise RequestError("the prompt is empty")
        if bad := out_of_vocabulary(prompt, vocab):
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        limit = self.max_model_len - 1  # longer prompts than a step run in chunks
        if len(prompt) > limit:
            raise RequestError(f"the prompt has {len(prompt)} tokens, longer than the context allows "
                               f"({limit}: max_model_len {self.max_model_len}, which the model's context "
                               "and the KV cache bound)")
        try:
            params.validate(vocab)
        except ValueError as e:
            raise RequestError(str(e)) from None

    def abort(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self._end(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule and launch one step; returns the tokens that reached the host: with async
        scheduling, the previous step's (this one stays in flight while the device computes it, and
        the next step takes its tokens from the device), else this step's."""
        batch = self.scheduler.schedule()
        prev, self._inflight = self._inflight, None
        if not batch.seqs:
            if prev is not None:  # nothing new to launch: the step in flight ends it
                return self._complete(prev)
            if self.scheduler.waiting and not self.scheduler.running:
                seq = self.scheduler.waiting[0]  # cannot fit even alone: fail it rather than spin
                self.scheduler.finish(seq, "error")
                return [StepOutput(seq, None, True, f"the request needs {len(seq)} tokens of KV cache, more than "
                                   f"the {self.blocks.num_usable * self.blocks.block_size} the cache holds")]
            return []
        inputs = build_step(batch, self.blocks.block_size, self.table_rows)
        self.stats.prefill_tokens += inputs.prefill_tokens
        self.stats.decode_tokens += inputs.decode_tokens
        # A prompt chunk that leaves more of its prompt to compute samples nothing.
        done = [i for i in range(len(batch.seqs)) if batch.completes(i)]
        t0 = time.perf_counter()
        extras = self._extras(batch.seqs, done)
        if extras is not None:
            self.stats.extras_steps += 1
            self.stats.mask_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        logits = self.executor.run(inputs.ids, inputs.positions, inputs.meta, inputs.logits_rows,
                                   candidates_needed([batch.seqs[i].params for i in done]), extras,
                                   self._carried(inputs, prev))
        self.stats.overlapped_steps += prev is not None
        self.stats.forward_seconds += time.perf_counter() - t0
        self.stats.steps += 1
        form = self.executor.last_ran
        self.stats.forms[form] = self.stats.forms.get(form, 0) + 1
        # The step's tokens are in the cache once the device runs it (later steps queue behind it), and
        # the blocks' hashes need only the tokens: hashed here, while the device computes, rather than
        # after the sampling waits for it.
        record_computed(batch, self.blocks)
        # a grammar's matcher must see each token before the next step is built, also while it waits
        # (unmasked) for its start token: a constrained row completes at once, as a seeded one
        if self.async_scheduling and extras is None and all(
                on_device(batch.seqs[i].params) and batch.seqs[i].constraint is None for i in done):
            if done:  # sampled on the device: the tokens stay there for the next step
                self._inflight = InFlight.launch(batch, done, _rows(logits, done, len(batch.seqs)))
            return self._complete(prev) if prev is not None else []
        out = self._complete(prev) if prev is not None else []
        return out + self._sample_now(batch, done, logits, extras)

    def _carried(self, inputs, prev: "InFlight | None") -> Carried | None:
        """The step's pending ids, from the step in flight's tokens on the device."""
        if not inputs.carried_rows:
            return None
        src = [prev.row_of[seq.id] for seq in inputs.carried_seqs]
        return Carried(inputs.carried_rows, prev.pick(src))

    def _complete(self, f: "InFlight") -> list[StepOutput]:
        """A step launched earlier: its tokens (now on the host) appended, stops checked. Rows of
        sequences that ended meanwhile (a stop found a step earlier, an abort) are dropped."""
        toks, status = f.on_host()
        out = []
        for j, i in enumerate(f.done):
            seq = f.batch.seqs[i]
            seq.pending -= 1
            if seq.status is Status.FINISHED:
                continue
            if status[j]:
                out.append(self._fail(seq, FAILURES[status[j]]))
                continue
            out.append(self._accept(seq, toks[j]))
        return out

    def _accept(self, seq: Sequence, tok: int, logprob=None, top=None) -> StepOutput:
        seq.output.append(tok)
        if seq.status is Status.RUNNING:  # a block this token filled joins the prefix cache
            self.blocks.cache_full_blocks(seq)
        reason = self._stop_reason(seq, tok)
        if reason:
            self._end(seq, reason)
        return StepOutput(seq, tok, reason is not None, None, logprob, top)

    def _end(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.forget(seq.id)

    def _fail(self, seq: Sequence, why: str) -> StepOutput:
        """This request ends alone with an error; its blocks go back."""
        self._end(seq, "error")
        return StepOutput(seq, None, True, why)

    def _sample_now(self, batch, done: list[int], logits, extras) -> list[StepOutput]:
        """This step's tokens sampled on the host side (any sampling parameters, grammars, logprobs)."""
        sampled, failed = {}, {}
        if done:
            toks, bad = self.sampler.sample(_rows(logits, done, len(batch.seqs)), [batch.seqs[i].id for i in done],
                                            [batch.seqs[i].params for i in done])
            sampled = dict(zip(done, toks))
            failed = {done[j]: why for j, why in bad.items()}
            for i, tok in sampled.items():
                c = batch.seqs[i].constraint
                if i not in failed and c is not None and not c.accept(tok):
                    failed[i] = f"the grammar does not allow the sampled token {tok}"
        logprobs = self._logprobs(batch.seqs, logits, sampled, failed) if extras and extras.top_logprobs is not None \
            else {}
        out = []
        for i, seq in enumerate(batch.seqs):
            if seq.status is Status.FINISHED:  # the step before ended it (async scheduling)
                continue
            if i in failed:  # this request fails alone; its blocks go back
                out.append(self._fail(seq, failed[i]))
                continue
            if i not in sampled:
                continue
            out.append(self._accept(seq, sampled[i], *logprobs.get(i, (None, None))))
        return out

    def _extras(self, seqs: list[Sequence], done: list[int]) -> StepExtras | None:
        """The step's grammar masks and logprobs needs; None (nothing sent, nothing computed) when no
        sampled row is constrained or asks for logprobs."""
        rows = [i for i in done if seqs[i].constraint is not None and seqs[i].constraint.active]
        want = [seqs[i].params.logprobs for i in done if seqs[i].params.logprobs is not None]
        if not rows and not want:
            return None
        mask = None
        if rows:
            mask = bitmask(len(rows), self.model_config.vocab_size)
            for j, i in enumerate(rows):
                seqs[i].constraint.fill(mask, j)
        return StepExtras(rows, mask, max(want) if want else None)

    def _logprobs(self, seqs, logits, sampled: dict[int, int], failed) -> dict[int, tuple]:
        """{row: (the sampled token's logprob, its top alternatives)} for the rows that asked: raw logits
        (before temperature and the grammar's mask) less the row's logsumexp over the vocabulary."""
        stats = self.executor.last_logprobs
        rows = [i for i in sampled if i not in failed and seqs[i].params.logprobs is not None]
        if not rows or stats is None:
            return {}
        at = torch.tensor(rows, device=logits.device)
        toks = torch.tensor([sampled[i] for i in rows], device=logits.device)
        lse = stats.lse.to(logits.device)[at]
        chosen = (logits[at, toks] - lse).tolist()
        top_lp = (stats.top_values.to(logits.device)[at] - lse[:, None]).tolist()
        top_ids = stats.top_ids[at.to(stats.top_ids.device)].tolist()
        out = {}
        for j, i in enumerate(rows):
            n = seqs[i].params.logprobs
            out[i] = (chosen[j], list(zip(top_ids[j][:n], top_lp[j][:n])))
        return out

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        # ignore_eos ignores the model's end tokens only; the request's own stop ids still stop it (as vLLM)
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.model_config.eos_token_ids):
            return "stop"
        if len(seq.output) >= p.max_tokens:
            return "length"
        if len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    # ---- convenience --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Sequence]:
        """Run prompts as one continuous batch to completion; outputs in prompt order."""
        params = params if isinstance(params, list) else [params or self.sampling_params()] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return seqs
