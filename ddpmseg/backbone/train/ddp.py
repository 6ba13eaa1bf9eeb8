"""The DDP plumbing of backbone training: joining the process group, keeping ranks in step."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist

from ddpmseg.core.device import resolve_device
from ddpmseg.core.errors import RunError


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@contextlib.contextmanager
def process_group(device: str | torch.device) -> Iterator[tuple[int, int, torch.device]]:
    """Join torchrun's process group (nccl on ``cuda:LOCAL_RANK``, gloo on the CPU) unless the
    caller already has; yields (rank, world_size, device) and leaves a group it made."""
    world_size = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    own_group = not dist.is_initialized()
    if own_group:
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    try:
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RunError("the process group does not match WORLD_SIZE / RANK",
                           "launch with torchrun")
        yield rank, world_size, dev
    finally:
        if own_group:
            dist.destroy_process_group()


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def agree(value: bool, world_size: int, device: torch.device) -> bool:
    """Rank 0's ``value`` on every rank (one process: ``value``); keeps the ranks in step."""
    if world_size == 1:
        return value
    flag = torch.tensor([1 if value else 0], dtype=torch.int32,
                        device=device if device.type == "cuda" else "cpu")
    dist.broadcast(flag, 0)
    return bool(flag.item())


def mean_over_ranks(acc: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """The accumulated losses averaged over the ranks (one process: as they are)."""
    if world_size == 1 or not acc:
        return acc
    keys = sorted(acc)
    vals = torch.stack([torch.as_tensor(acc[k], dtype=torch.float32) for k in keys])
    dist.all_reduce(vals)
    vals = vals / world_size
    return {k: vals[i] for i, k in enumerate(keys)}


def gather_rng_states(world_size: int, device: torch.device) -> list:
    """Every rank's (torch, cuda) RNG state, on every rank (saved so each dropout stream
    resumes)."""
    mine = (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    states = [None] * world_size
    dist.all_gather_object(states, mine)
    return states
