"""torchrun helpers shared by pretraining and the tasks: placing a process, and collectives that are
no-ops in a single process."""
import datetime
import os
import re

import torch
import torch.distributed as dist


def world_size() -> int:
    """The process count torchrun announces (1 under plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(requested=None, world=None, option="--device ") -> torch.device:
    """The one device of a run, from the command line's `--device` (None or 'auto': CUDA when there is one).

    Under torchrun (WORLD_SIZE > 1) each process takes the GPU of its LOCAL_RANK, so only 'cpu' or 'cuda' may be
    asked for; in one process 'cuda:N' is GPU N. The returned torch.device is what every task receives.
    `option` names the setting in errors ('--device ' for the commands, 'device=' for pretraining)."""
    from core.cli import UserError

    world = world_size() if world is None else world
    requested = None if requested in (None, "auto") else str(requested)
    if requested is not None and not (requested == "cpu" or re.fullmatch(r"cuda(:\d+)?", requested)):
        raise UserError(f"{option}{requested!r} is not cpu, cuda or cuda:N")
    if requested is not None and requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option}{requested} asked for CUDA, but no CUDA device is available; use {option}cpu")
    if world > 1 and requested not in (None, "cpu", "cuda"):
        raise UserError(f"under torchrun {option.strip()} is cpu or cuda (each process takes the GPU of its LOCAL_RANK), "
                        f"not {requested!r}")
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if world > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        index = int(requested.split(":")[1]) if ":" in requested else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"{option}{requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return torch.device("cpu")


# Whether setup_distributed made the process group: shutdown leaves a group that its caller made to the caller
# (a script that runs several trainings or evaluations in one torchrun keeps its group between them).
_made_the_group = False


def setup_distributed(device: torch.device):
    """Place this process on `device` (from `resolve_device`): make it the current CUDA device, and under torchrun
    (WORLD_SIZE > 1) join the process group (NCCL on CUDA, Gloo on CPU) unless the caller already has.
    Returns (torch.device, rank, world)."""
    global _made_the_group
    device = torch.device(device)
    world = world_size()
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # Rank 0 alone scores the test set after training while the others wait for the next collective:
        # a long timeout, so that a large test set does not end the run.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3),
                                device_id=device if device.type == "cuda" else None)
        _made_the_group = True
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
    """Leave the process group that setup_distributed made (one made by the caller stays)."""
    global _made_the_group
    if initialized() and _made_the_group:
        dist.destroy_process_group()
        _made_the_group = False


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every process (`obj` itself in a single process)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
