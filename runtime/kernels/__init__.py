"""Triton-language GPU kernels of the runtime's torch backend."""
from __future__ import annotations

import functools

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors: what the kernels' block-size rules divide work by (1
    off CUDA, as under the interpreter)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count
