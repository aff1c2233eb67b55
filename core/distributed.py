"""torchrun helpers shared by pretraining and the tasks: placing a process, and collectives that are
no-ops in a single process."""
import datetime
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """The process count torchrun announces (1 under plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(want_cuda: bool):
    """Place this process: under torchrun (WORLD_SIZE > 1) join the process group (NCCL on CUDA, Gloo on CPU)
    and take the GPU of LOCAL_RANK. Returns (torch.device, rank, world size)."""
    world = world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # Rank 0 alone scores the test set after training while the others wait for the next collective:
        # a long timeout, so that a large test set does not end the run.
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(hours=3))
    return device, rank, world


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_sum(value: int, device="cpu") -> int:
    """The sum of an integer over the processes."""
    if not initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The global batch along dim 0, with gradients flowing back to every process's part."""
    if not initialized():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), 0)


def gather_objects(obj):
    """Every process's `obj`, in rank order (a list of one in a single process)."""
    if not initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if initialized():
        dist.barrier()


def shutdown() -> None:
    if initialized():
        dist.destroy_process_group()
