"""Request checks shared by every front end (the OpenAI server, the Triton model, chat.py): each value a
client can send is checked here before anything reaches the engine, and a failure names the field.

What is checked where (docs/DESIGN.md, "Validation", says the same):
- here: the meaning of each sampling field, whatever its transport: finite numbers in range
  (temperature >= 0, 0 < top_p <= 1, top_k >= -1, a seed within 64 bits, max_tokens >= 1), stop
  strings and stop ids within bounds, the prompt plus max_tokens within the context (a 400 naming
  both numbers, as vLLM answers), and tool definitions (type function, a name, object parameters);
- the OpenAI layer (runtime/serving/openai_protocol.py): JSON types and shapes through pydantic, so
  /openapi.json documents them, then these checks;
- the engine (LLMEngine.check_request): token ids within the vocabulary and the prompt within the
  context, the last line for callers that use the engine directly.

Temperatures below 1e-5 are greedy, as vLLM treats them: dividing logits by them overflows float32.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .sampling import SamplingParams

GREEDY_BELOW = 1e-5          # vLLM's _SAMPLING_EPS: temperatures below it sample greedily
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024        # per stop string: each is searched for in every new piece of text
MAX_STOP_IDS = 64
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # what torch.Generator.manual_seed takes
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names, and '.'
MAX_TOOLS = 512


class RequestError(ValueError):
    """This request cannot run; the engine keeps serving the others. `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _number(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {value!r}", name)
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}", name)
    if lo_open and hi is not None and not lo < value <= hi:
        raise RequestError(f"{name} must be in ({lo}, {hi}], got {value!r}", name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RequestError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}", name)
    if hi is not None and value > hi:
        raise RequestError(f"{name} must be <= {hi}, got {value!r}", name)
    return value


def _integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise RequestError(f"{name} must be an integer, got {value!r}", name)
    if lo is not None and value < lo:
        raise RequestError(f"{name} must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise RequestError(f"{name} must be <= {hi}, got {value}", name)
    return value


@dataclass
class Limits:
    """What the served model allows: its vocabulary and the longest sequence (prompt + output)."""
    vocab_size: int
    max_model_len: int
    default_max_tokens: int = 512


def check_stops(stops) -> list[str]:
    if stops is None:
        return []
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    for s in stops:
        if len(s) > MAX_STOP_CHARS:
            raise RequestError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got {len(s)}", "stop")
    return [s for s in stops if s]


def sampling_params(limits: Limits, defaults, prompt_len: int, *, temperature=None, top_p=None, top_k=None,
                    max_tokens=None, seed=None, stop_token_ids=None, ignore_eos=False,
                    max_tokens_param: str = "max_tokens", prompt_param: str = "prompt") -> SamplingParams:
    """A request's SamplingParams, every value checked; what it leaves unset comes from the model's
    generation_config.json (`defaults`). Without max_tokens: the default, capped at what the context
    leaves; with it: prompt + max_tokens must fit the context."""
    if temperature is not None:
        temperature = float(_number("temperature", temperature, lo=0))
        if temperature < GREEDY_BELOW:
            temperature = 0.0
    if top_p is not None:
        top_p = float(_number("top_p", top_p, lo=0, hi=1, lo_open=True))
    if top_k is not None:
        top_k = _integer("top_k", top_k, lo=-1)
        top_k = max(top_k, 0)  # -1 (vLLM) and 0 both mean off
    if seed is not None:
        seed = _integer("seed", seed, *SEED_RANGE)
    room = limits.max_model_len - prompt_len
    if room < 1:
        raise RequestError(f"the prompt has {prompt_len} tokens, longer than the context allows: this model's "
                           f"maximum context length is {limits.max_model_len} tokens, with at least one for the "
                           "completion; shorten the prompt", prompt_param)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    else:
        max_tokens = _integer(max_tokens_param, max_tokens, lo=1)
        if prompt_len + max_tokens > limits.max_model_len:
            raise RequestError(f"this model's maximum context length is {limits.max_model_len} tokens; the request "
                               f"asks for {prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} in the "
                               f"completion): reduce the prompt or {max_tokens_param}", max_tokens_param)
    ids = []
    if stop_token_ids is not None:
        if not isinstance(stop_token_ids, list):
            raise RequestError("stop_token_ids must be a list of token ids", "stop_token_ids")
        if len(stop_token_ids) > MAX_STOP_IDS:
            raise RequestError(f"at most {MAX_STOP_IDS} stop_token_ids, got {len(stop_token_ids)}", "stop_token_ids")
        ids = [_integer("stop_token_ids", t) for t in stop_token_ids]
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise RequestError(f"stop_token_ids {bad[:5]} are outside the vocabulary (0..{limits.vocab_size - 1})",
                               "stop_token_ids")
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"ignore_eos must be a boolean, got {ignore_eos!r}", "ignore_eos")
    return SamplingParams.with_defaults(defaults, temperature, top_p, top_k, max_tokens=max_tokens, seed=seed,
                                        stop_token_ids=ids, ignore_eos=ignore_eos)


def out_of_vocabulary(ids: list, vocab_size: int) -> list:
    """The entries of a non-empty list that are not token ids of the vocabulary (bools are not ids).
    The common case at C speed (every type() exactly int, then min and max); the per-token scan only
    to name the bad ones (a prompt of 8192 ids: 0.85 against 1.24 ms on a loaded 2-core machine)."""
    if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab_size:
        return []
    return [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]


def check_prompt_ids(ids, vocab_size: int, param: str = "prompt") -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise RequestError("the prompt is empty", param)
    if bad := out_of_vocabulary(ids, vocab_size):
        raise RequestError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})", param)
    return ids


def check_tools(tools) -> list[dict] | None:
    """OpenAI `tools`: each {"type": "function", "function": {"name", "description"?, "parameters"?}}
    with a JSON-schema object (or nothing) as parameters. Returns them as plain dicts."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", "tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    names = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise RequestError(f"{where} must be an object", where)
        if t.get("type") != "function":
            raise RequestError(f"{where}.type must be 'function', got {t.get('type')!r}", f"{where}.type")
        f = t.get("function")
        if not isinstance(f, dict):
            raise RequestError(f"{where}.function must be an object with a name", f"{where}.function")
        name = f.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise RequestError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '-' or '.', "
                               f"got {name!r}", f"{where}.function.name")
        if name in names:
            raise RequestError(f"{where}.function.name {name!r} is declared twice", f"{where}.function.name")
        names.add(name)
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise RequestError(f"{where}.function.description must be a string", f"{where}.function.description")
        p = f.get("parameters")
        if p is not None:
            if not isinstance(p, dict):
                raise RequestError(f"{where}.function.parameters must be a JSON-schema object, got {p!r}",
                                   f"{where}.function.parameters")
            if p.get("type", "object") != "object":
                raise RequestError(f"{where}.function.parameters must have type 'object', got {p.get('type')!r}",
                                   f"{where}.function.parameters")
            props = p.get("properties")
            if props is not None and not (isinstance(props, dict) and all(isinstance(v, dict) for v in props.values())):
                raise RequestError(f"{where}.function.parameters.properties must map names to schemas",
                                   f"{where}.function.parameters")
    return tools
