"""Host-to-device copies that do not wait for the device: with async scheduling a step's inputs are
copied while the previous step still runs, and a copy from pageable memory may wait for the stream
(the driver stages it); from pinned memory it is queued. PyTorch's caching host allocator keeps a
pinned block until the copies reading it have run, so each call may take a fresh one."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t (a CPU tensor) on `device`; to a GPU through pinned memory, without a host sync."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_in(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), from pinned memory when src is on the host and dst on a GPU (no host sync)."""
    if dst.is_cuda and src.device.type == "cpu":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


def rows_index(rows: list[int], device) -> slice | torch.Tensor:
    """An index of `rows` for a device tensor's first dimension: a slice when they are 0..n-1 (the
    decodes come first: no copy), else an int64 tensor on the device (one pinned copy)."""
    if rows == list(range(len(rows))):
        return slice(0, len(rows))
    return to_device(torch.tensor(rows, dtype=torch.int64), device)


def set_rows(ids: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    """ids[rows] = values on the device."""
    ids[rows_index(rows, ids.device)] = values
