"""torch.distributed set-up for `torchrun`: NCCL on GPU, gloo on CPU; one process per device."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import InputError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this process created the process group (and so destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Ranks:
    """Join the job torchrun describes (WORLD_SIZE > 1) or an already initialised group; else one process."""
    wanted = torch.device(device)
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but no CUDA GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = False
    if not dist.is_initialized() and world > 1:
        if wanted.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
        owns = True
    if not dist.is_initialized():
        return Ranks(0, 1, wanted, False)
    if wanted.type == "cuda":  # one GPU per rank: torchrun's LOCAL_RANK decides which
        wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(wanted)
    return Ranks(dist.get_rank(), dist.get_world_size(), wanted, owns)


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def from_main(ranks: Ranks, value: Any) -> Any:
    """Rank 0's `value` on every rank (identity in one process)."""
    if ranks.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ranks: Ranks, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if ranks.world_size == 1:
        return [value]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out
