"""Chat with MiniMax-M2 from an export (per-layer subgraphs + manifest).

    python runtime/chat.py                         # the embedded toy model (built on first use)
    python runtime/chat.py --model build/<model>/onnx [--backend ort|torch] [--temperature 0.7]

Interactive: type a message; the model's thinking streams dimmed, then its answer. Commands:
/reset starts over (the system prompt is kept), /system TEXT sets the system prompt (and starts
over; /system alone clears it), /help lists them, /quit (or Ctrl-D, or Ctrl-C at an empty prompt)
leaves. Ctrl-C during an answer stops it and keeps the chat.

Scripted (tests, benchmarks): every --prompt-ids / --prompt runs as one continuous batch and the last
line printed is one JSON object {"outputs": [[generated ids], ...]} in prompt order:

    python runtime/chat.py --model DIR --prompt-ids 1,5,9 --prompt-ids 4,4 --max-tokens 16 --temperature 0 --json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.manifest import ManifestError  # noqa: E402
from export.paths import TINY_CHECKPOINT, tp_dir  # noqa: E402
from export.token_ids import parse_ids  # noqa: E402
from runtime.config import EngineConfig  # noqa: E402
from runtime.distributed import RankLost  # noqa: E402
from runtime import validation  # noqa: E402
from runtime.llm_engine import LLMEngine, RequestError  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402
from runtime.output_text import OutputText  # noqa: E402
from runtime.text import Conversation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIM, RESET = "\033[2m", "\033[0m"


def ensure_embedded_default() -> Path:
    """The embedded toy model's export, built here on first use (about a minute on a CPU)."""
    export = tp_dir(TINY_CHECKPOINT / "onnx", 1)
    if (export / "manifest.json").is_file():
        return export
    print("Building the embedded toy model (make tiny && make onnx) ...", file=sys.stderr)
    if not (TINY_CHECKPOINT / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "export.tiny", str(TINY_CHECKPOINT)], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "export.to_onnx", str(TINY_CHECKPOINT), "--tp", "1",
                    "--out", str(TINY_CHECKPOINT / "onnx")], cwd=ROOT, check=True)
    return export


COMMANDS = {"/reset": "start over (the system prompt is kept)",
            "/system TEXT": "set the system prompt and start over (/system alone clears it)",
            "/help": "list the commands", "/quit": "leave (also /exit, Ctrl-D, or Ctrl-C at an empty prompt)"}


def sampling_from(a, engine: LLMEngine, prompt_len: int) -> SamplingParams:
    """The same checks as the servers' (runtime/validation.py): RequestError names a bad flag."""
    return validation.sampling_params(engine.limits, engine.generation_defaults, prompt_len,
                                      temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                      max_tokens=a.max_tokens, seed=a.seed, ignore_eos=a.ignore_eos)


NO_TOKENIZER = ("this export has no tokenizer.json (the checkpoint had none): text needs a tokenizer; "
                "give prompts as token ids (--prompt-ids)")


def scripted(engine: LLMEngine, a) -> int:
    prompts = [list(p) for p in a.prompt_ids or []]
    if a.prompt and engine.codec is None:
        print(f"error: {NO_TOKENIZER}", file=sys.stderr)
        return 2
    prompts += [engine.codec.encode_chat([{"role": "user", "content": t}], thinking=not a.no_thinking)
                for t in a.prompt or []]
    seqs, errors = [], {}
    for i, p in enumerate(prompts):
        try:
            seqs.append(engine.add_request(p, sampling_from(a, engine, len(p))))
        except RequestError as e:
            errors[i] = str(e)
            seqs.append(None)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    dt = time.perf_counter() - t0
    outputs = [s.output if s else None for s in seqs]
    n = sum(len(o) for o in outputs if o)
    if not a.json:
        for p, s, o in zip(prompts, seqs, outputs):
            if s is None:
                continue
            text = engine.codec.tok.decode(o, skip_special_tokens=False) if engine.codec else o
            print(f"prompt ({len(p)} tokens) -> {len(o)} tokens, {s.finish_reason}: {text!r}")
    for i, e in errors.items():
        print(f"error in prompt {i}: {e}", file=sys.stderr)
    st = engine.stats
    print(f"{n} tokens in {dt:.2f} s ({n / dt if dt else 0:.1f} tokens/s, {st.steps} steps ({st.overlapped_steps} overlapped), "
          f"{1000 * st.forward_seconds / max(st.steps, 1):.2f} ms forward per step, backend {engine.backend.name}, "
          f"TP {engine.manifest.tp})", file=sys.stderr)
    result = {"outputs": outputs}
    if errors:
        result["errors"] = {str(k): v for k, v in errors.items()}
    print(json.dumps(result))
    return 1 if errors else 0


def interactive(engine: LLMEngine, a) -> int:
    codec = engine.codec
    if codec is None:
        print(f"error: {NO_TOKENIZER}", file=sys.stderr)
        return 2
    conv = Conversation(codec, a.system, thinking=not a.no_thinking)
    print(f"MiniMax-M2 chat ({engine.manifest.root}, backend {engine.backend.name}, TP {engine.manifest.tp}). "
          "/help lists the commands; Ctrl-C stops an answer, Ctrl-D leaves.")
    while True:
        try:
            user = input("\n> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-C at the prompt: leaving. bye)")
            return 0
        if not user:
            continue
        if user.startswith("//"):  # a message that starts with '/', not a command
            user = user[1:]
        elif user.startswith("/"):
            cmd, rest = user.split()[0], user[len(user.split()[0]):].strip()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                print("\n".join(f"  {k:<14} {v}" for k, v in COMMANDS.items()))
            elif cmd == "/reset":
                conv = Conversation(codec, conv.messages[0]["content"] if conv.messages[:1] and
                                    conv.messages[0]["role"] == "system" else None, conv.thinking)
                print("(conversation reset; the system prompt is kept)")
            elif cmd == "/system":
                conv = Conversation(codec, rest or None, conv.thinking)
                print("(system prompt set; conversation reset)" if rest else "(system prompt cleared; conversation reset)")
            else:
                print(f"error: unknown command {cmd!r}; the commands are: "
                      + ", ".join(k.split()[0] for k in COMMANDS) + " (start a message with '//' to send one "
                      "that begins with '/')")
            continue
        try:
            prompt = conv.prompt(user)
            seq = engine.add_request(prompt, sampling_from(a, engine, len(prompt)))
        except (RequestError, ValueError) as e:
            print(f"error: {e}")
            continue
        text_out = OutputText(codec, thinking=codec.in_thinking(prompt))
        t0, first, channel = time.perf_counter(), None, None

        def show(delta) -> None:
            nonlocal channel
            for ch, text in (("thinking", delta.reasoning), ("answer", delta.content)):
                if text:
                    if ch != channel:
                        print(RESET + ("\n" if channel else "") + (DIM if ch == "thinking" else ""), end="")
                        channel = ch
                    print(text, end="", flush=True)

        try:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.seq is not seq:
                        continue
                    if out.error is not None:
                        print(RESET + f"\nerror: {out.error}", end="")
                        continue
                    first = first or time.perf_counter()
                    show(text_out.feed(out.token))
            show(text_out.finish())
        except KeyboardInterrupt:
            engine.abort(seq)
            print(RESET + " [stopped]", end="")
        dt = time.perf_counter() - t0
        print(RESET)
        n = len(seq.output)
        if first:
            ttft = first - t0
            rate = (n - 1) / (dt - ttft) if n > 1 and dt > ttft else 0.0
            print(f"{DIM}[{n} tokens, {seq.finish_reason}; first token {ttft * 1000:.0f} ms, {rate:.1f} tokens/s; "
                  f"prefilled {seq.num_prefilled}, reused {seq.num_cached_prompt} from cache]{RESET}")
        conv.commit(user, prompt, seq.output)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python runtime/chat.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="export folder, tp<N> folder or manifest.json (default: the embedded toy model)")
    ap.add_argument("--prompt-ids", type=parse_ids, action="append",
                    help="a prompt as token ids (repeatable); needs no tokenizer")
    ap.add_argument("--prompt", action="append", help="a user message, through the chat template (repeatable)")
    ap.add_argument("--json", action="store_true", help="scripted mode: print only the JSON result on stdout")
    ap.add_argument("--system", help="system prompt (interactive)")
    ap.add_argument("--max-tokens", type=int, help="tokens per answer (default 512, or what the context leaves)")
    ap.add_argument("--temperature", type=float, help="0 for greedy (default: generation_config.json's; published 1.0)")
    ap.add_argument("--top-p", type=float, help="nucleus sampling (default: generation_config.json's; published 0.95)")
    ap.add_argument("--top-k", type=int, help="top-k sampling, 0 off (default: generation_config.json's; published 40)")
    ap.add_argument("--seed", type=int, help="sampling seed")
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-turn token")
    ap.add_argument("--no-thinking", action="store_true",
                    help="skip the thinking block: the prompt closes it (<think></think>) so the answer starts at once")
    EngineConfig.add_cli_args(ap.add_argument_group("runtime"))
    a = ap.parse_args(argv)
    try:
        model = Path(a.model) if a.model else ensure_embedded_default()
        if a.json and not (a.prompt_ids or a.prompt):
            ap.error("--json needs --prompt-ids or --prompt")
        engine = LLMEngine.start(model, EngineConfig.from_args(a))
    except (ManifestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return scripted(engine, a) if (a.prompt_ids or a.prompt) else interactive(engine, a)
    except RankLost as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
