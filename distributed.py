"""Process-group setup and teardown, rank-aware logging and object gathering.

Shared by train_ddp.py and eval_bleu.py. Under torchrun (WORLD_SIZE > 1) it joins the
process group: nccl with one GPU per local rank on CUDA, gloo on CPU. Without torchrun
it is a single process and every collective helper here returns its input unchanged.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 900  # a collective that waits longer raises instead of hanging


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(request: str, local_rank: int) -> torch.device:
    """Map --device auto|cpu|cuda to this rank's device."""
    if request not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {request!r} is invalid; use auto, cpu or cuda")
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested, but torch.cuda.is_available() is False")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible. "
            "Start at most one process per GPU (torchrun --nproc_per_node)."
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup_distributed(device_request: str = "auto", timeout_s: int = DEFAULT_TIMEOUT_S) -> DistributedContext:
    """Join the torchrun process group if there is one and return this rank's context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        init_kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **init_kwargs)
    return DistributedContext(rank, local_rank, world_size, device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, verbose_all_ranks: bool = False) -> None:
    """Log INFO on rank 0 and WARNING and above on the other ranks, each record tagged with its rank."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 or verbose_all_ranks else logging.WARNING)


def all_gather_objects(obj: object) -> list:
    """Return every rank's `obj`, in rank order; a one-element list without a process group."""
    if not dist.is_initialized():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place and return it."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
