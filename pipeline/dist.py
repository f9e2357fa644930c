"""torch.distributed helpers: the pipeline runs unchanged as one process or under torchrun."""

from __future__ import annotations

import os

CPUS_ENV = "PIPELINE_CPUS"  # the cores a process may use (stages.models.usable_cores), set per student by fanout


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group torchrun set up (gloo on CPU, nccl with CUDA); no-op for one process."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend)


def barrier() -> None:
    if world_size() <= 1:
        return
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    if world_size() <= 1:
        return values
    import torch
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_min(value: int) -> int:
    if world_size() <= 1:
        return value
    import torch
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.int64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item())


def broadcast_object(obj):
    """Rank 0's ``obj`` (anything picklable) on every rank; ``obj`` itself for one process."""
    if world_size() <= 1:
        return obj
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
