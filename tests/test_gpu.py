"""The runtime's GPU path (torch backend): CUDA-graph replay against the same steps run eagerly, the
GPU against the CPU, and tensor parallelism over NCCL. Run with `make test-gpu` on a GPU machine."""
import json

import pytest
import torch

from tests.cli import run_chat

pytestmark = pytest.mark.gpu
N_NEW = 48
PROMPTS = [[1, 5, 9], [7], list(range(40, 57)), [3, 1, 4, 1, 5, 9, 2, 6]]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def chat(model, *args):
    ids = [x for p in PROMPTS for x in ("--prompt-ids", ",".join(map(str, p)))]
    r = run_chat("--model", model, *ids, "--max-tokens", N_NEW, "--temperature", 0, "--ignore-eos", "--json", *args,
                 timeout=600)
    assert r.returncode == 0, r.stderr
    print(r.stderr.strip().splitlines()[-1])  # the speed line
    return json.loads(r.stdout.strip().splitlines()[-1])["outputs"]


def recorded_logits(engine) -> list[torch.Tensor]:
    """The list every sampled row's float32 logits go to, as the engine samples (its sampler wrapped;
    async scheduling off, so that every row goes through it)."""
    engine.async_scheduling = False
    recorded = []
    sample = engine.sampler.sample

    def recording(logits, seq_ids, params):
        recorded.extend(logits.float().cpu())
        return sample(logits, seq_ids, params)

    engine.sampler.sample = recording
    return recorded


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_replay_equals_eager(dtype, exported):
    root = exported("tiny", 1).root
    graphs = chat(root, "--backend", "torch", "--device", "cuda", "--dtype", dtype)
    eager = chat(root, "--backend", "torch", "--device", "cuda", "--dtype", dtype, "--no-cuda-graphs")
    assert graphs == eager


@needs_gpu
def test_gpu_float32_equals_cpu(exported):
    root = exported("tiny", 1).root
    assert chat(root, "--backend", "torch", "--device", "cuda", "--dtype", "float32") == \
        chat(root, "--backend", "torch", "--device", "cpu", "--dtype", "float32")


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_with_graphs_equals_tp1(exported):
    one = chat(exported("tiny", 1).root, "--backend", "torch", "--device", "cuda", "--dtype", "float32")
    two = chat(exported("tiny", 2).root, "--backend", "torch", "--device", "cuda", "--dtype", "float32")
    assert one == two


@needs_gpu
def test_gpu_bfloat16_agrees_with_cpu_float32_within_bf16_tolerance(exported):
    """The runtime on the GPU in bf16 (CUDA graphs, Triton attention and MoE kernels), its logits
    recorded as it samples, against the float32 model on the CPU fed the same tokens. BF16 tolerance
    as in tests/test_model_vs_transformers.py: median per-position relative logit error <= 2%
    (router near-ties that bf16 flips give rare large ones), and the tokens equal float32's argmax
    at >= 90% of positions (the same bar as the model's own BF16 test)."""
    from export.checkpoint import Checkpoint
    from export.model import Model
    from runtime.config import EngineConfig
    from runtime.llm_engine import LLMEngine
    from runtime.sampling import SamplingParams

    man = exported("tiny", 1)
    engine = LLMEngine(man.root, EngineConfig(backend="torch", device="cuda", dtype="bfloat16",
                                              async_scheduling=False))  # every row through the recorded sampler
    recorded = {}
    sample = engine.sampler.sample

    def recording(logits, seq_ids, params):
        for sid, row in zip(seq_ids, logits.float().cpu()):
            recorded.setdefault(sid, []).append(row)
        return sample(logits, seq_ids, params)

    engine.sampler.sample = recording
    seqs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True))
    engine.close()
    model = Model(Checkpoint(man.checkpoint_dir()), torch.float32)
    errors, equal = [], 0
    for prompt, seq in zip(PROMPTS, seqs):
        ref = model.logits(torch.tensor(prompt + seq.output[:-1]))[len(prompt) - 1:]
        gpu = torch.stack(recorded[seq.id])
        assert gpu.shape == ref.shape and gpu.argmax(-1).tolist() == seq.output  # what was sampled
        errors += ((gpu - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
        equal += sum(int(a == b) for a, b in zip(ref.argmax(-1).tolist(), seq.output))
    errors.sort()
    median = errors[len(errors) // 2]
    print(f"bf16 GPU vs float32 CPU: median relative logit error {median:.4f}, max {errors[-1]:.3f}; "
          f"tokens equal to float32's argmax at {equal} of {len(errors)} positions")
    assert median <= 0.02
    assert equal >= 0.9 * len(errors)


@needs_gpu
def test_long_prompt_prefill_kernels_agree_with_cpu_float32(exported):
    """A 4,000-token prompt (the toy's context is 4,096) in 2,048-token chunks on the GPU in bf16: the
    prefill kernels (attention-in with the QK norm + RoPE kernel, the paged prefill attention over the
    cached chunk, the router's top-k kernel, the grouped-GEMM experts and their ordering kernels),
    both chunks replayed from CUDA graphs (the second padded), then decode, against the float32 model on
    the CPU fed the same tokens. The bar of the bf16 test
    above: median relative logit error <= 2%, tokens equal float32's argmax at >= 90%. (The split of
    long contexts' keys is checked at the kernel, tests/test_paged_prefill.py.)"""
    from export.checkpoint import Checkpoint
    from export.model import Model
    from runtime.config import EngineConfig
    from runtime.llm_engine import LLMEngine
    from runtime.sampling import SamplingParams

    man = exported("tiny", 1)
    engine = LLMEngine(man.root, EngineConfig(backend="torch", device="cuda", dtype="bfloat16", kv_cache_gb=1,
                                              max_num_batched_tokens=2048))
    recorded = recorded_logits(engine)
    prompt = torch.randint(0, 800, (4000,), generator=torch.Generator().manual_seed(5)).tolist()
    seq = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    forms = dict(engine.stats.forms)
    replayed = engine.executor.prefill_graphs.steps
    engine.close()
    assert forms.get("grouped-kernel", 0) >= 2, forms  # both chunks ran the grouped kernels
    assert replayed == 2  # from CUDA graphs: 2048 tokens, then 1952 padded to 2048
    ref = Model(Checkpoint(man.checkpoint_dir()), torch.float32).logits(torch.tensor(prompt + seq.output[:-1]))
    ref = ref[len(prompt) - 1:]
    gpu = torch.stack(recorded)
    assert gpu.shape == ref.shape and gpu.argmax(-1).tolist() == seq.output
    errors = sorted(((gpu - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist())
    equal = sum(int(a == b) for a, b in zip(ref.argmax(-1).tolist(), seq.output))
    print(f"4000-token prompt, bf16 GPU vs float32 CPU: median relative logit error {errors[len(errors) // 2]:.4f}, "
          f"tokens equal at {equal} of {len(errors)}; forms {forms}")
    assert errors[len(errors) // 2] <= 0.02
    assert equal >= 0.9 * len(errors)


def _recorded_run(root, prompt, n_new, dtype, prefill: str):
    """Greedy tokens and every sampled row's logits, one prompt alone in steps of 256 tokens;
    prefill: "graphs" (replayed), "padded" (the same padded chunks, eagerly), "plain" (eager, unpadded)."""
    from runtime.config import EngineConfig
    from runtime.llm_engine import LLMEngine
    from runtime.sampling import SamplingParams

    engine = LLMEngine(root, EngineConfig(backend="torch", device="cuda", dtype=dtype, max_num_batched_tokens=256,
                                          prefill_graphs=prefill != "plain"))
    pg = engine.executor.prefill_graphs
    assert (pg is None) == (prefill == "plain")
    if prefill == "padded":
        pg.use_graphs = False
    recorded = recorded_logits(engine)
    seq = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))[0]
    steps, graphs = (pg.steps, len(pg.graphs)) if pg else (0, 0)
    engine.close()
    return seq.output, torch.stack(recorded), steps, graphs


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_graphs_replay_equals_padded_eager(dtype, exported):
    """One sequence's prefill chunks replayed from CUDA graphs (runtime/prefill_graphs.py) against the
    same padded chunks run eagerly: equal logits, bit for bit (the same kernels on the same shapes).
    Against unpadded eager chunks: the same function on other shapes, so float32 gives the same
    tokens and logits within 1e-4 relative (cuBLAS may pick other kernels for other row counts);
    bf16 the bf16 bar of the tests above (median relative logit error <= 2%). 1000 tokens in steps
    of 256: three full chunks and 232 padded to 256."""
    root = exported("tiny", 1).root
    prompt = torch.randint(0, 800, (1000,), generator=torch.Generator().manual_seed(3)).tolist()
    tokens, logits, steps, graphs = _recorded_run(root, prompt, 8, dtype, "graphs")
    assert steps == 4 and graphs >= 1
    padded = _recorded_run(root, prompt, 8, dtype, "padded")
    assert padded[0] == tokens and torch.equal(padded[1], logits)
    plain = _recorded_run(root, prompt, 8, dtype, "plain")
    errors = ((plain[1] - logits).norm(dim=-1) / plain[1].norm(dim=-1)).sort().values
    print(f"prefill graphs vs plain eager ({dtype}): relative logit error median {errors[len(errors) // 2]:.2e}, "
          f"max {errors[-1]:.2e}")
    if dtype == "float32":
        assert plain[0] == tokens and errors[-1] <= 1e-4
    else:
        assert errors[len(errors) // 2] <= 0.02


@needs_gpu
def test_failed_capture_turns_graphs_off_and_the_request_goes_on(exported):
    """A prefill chunk whose CUDA-graph capture fails (here a host sync inside the capture, which CUDA
    refuses): the step runs again eagerly, padded as its graph would have been, and every later step
    too (the allocator cannot capture again in this process). The tokens equal the same padded steps
    run eagerly from the start, and the logits within 1e-3 relative: the same kernels on the same
    shapes (that run's decode steps replayed, these eager), so only float noise is allowed."""
    from runtime.config import EngineConfig
    from runtime.llm_engine import LLMEngine
    from runtime.sampling import SamplingParams

    root = exported("tiny", 1).root
    prompt = torch.randint(0, 800, (1000,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = LLMEngine(root, EngineConfig(backend="torch", device="cuda", dtype="bfloat16", max_num_batched_tokens=256))
    ex, pg = engine.executor, engine.executor.prefill_graphs
    forward = ex.forward

    def syncing(*args, **kw):
        out = forward(*args, **kw)
        if torch.cuda.is_current_stream_capturing() and kw.get("meta") is not None:
            out.sum().item()  # a host sync: not allowed while a stream is capturing
        return out

    ex.forward = syncing
    recorded = recorded_logits(engine)
    seq = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    state = (pg.use_graphs, ex.decode_graphs.use_graphs, len(pg.graphs), len(ex.decode_graphs.graphs), pg.steps)
    engine.close()
    assert state == (False, False, 0, 0, 5), state  # four chunks, the first run twice (capture, then eager)
    tokens, logits, _, _ = _recorded_run(root, prompt, 8, "bfloat16", "padded")
    errors = ((torch.stack(recorded) - logits).norm(dim=-1) / logits.norm(dim=-1))
    assert seq.output == tokens and errors.max() <= 1e-3, errors.max()


@needs_gpu
def test_async_scheduling_equals_one_step_at_a_time(exported):
    """Async scheduling on the GPU path (CUDA graphs; each step's ids taken from the previous step's
    tokens on the device, its inputs copied from pinned memory while that step runs) against the same
    engine one step at a time, float32 (the batch differs by discarded rows between the two, so
    bf16's batch-dependent rounding is kept out): the same tokens and finish reasons, for requests that
    end at different steps (so the carried rows are not always 0..n-1), one by a stop token."""
    from runtime.config import EngineConfig
    from runtime.llm_engine import LLMEngine
    from runtime.sampling import SamplingParams

    root = exported("tiny", 1).root
    runs = {}
    stop = None
    for mode in (False, True):
        engine = LLMEngine(root, EngineConfig(backend="torch", device="cuda", dtype="float32", async_scheduling=mode))
        if stop is None:  # a token the third prompt generates: its first one stops that request
            stop = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].output[12]
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (N_NEW, 9, N_NEW, 30)]
        params[2].stop_token_ids = [stop]
        seqs = engine.generate(PROMPTS, params)
        runs[mode] = [(s.output, s.finish_reason) for s in seqs]
        assert (engine.stats.overlapped_steps > 0) == mode
        assert engine.blocks.num_free == engine.blocks.num_usable
        engine.close()
    assert runs[True] == runs[False]
    assert runs[True][2][1] == "stop" and [r[1] for r in runs[True]].count("length") == 3
