"""Data-loader settings shared by pretraining, probes, extraction and detection: how many loading processes,
and the options that keep a GPU fed (pinned memory, workers that live across epochs)."""
import os

# At most 8 loading processes by default: decoding and augmenting JPEGs for one GPU saturates well below that
# (torchvision's references default to 16 per process for 8-GPU nodes, DINO and MAE to 10), and every worker
# holds a copy of the dataset's index in memory.
MAX_DEFAULT_WORKERS = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which Slurm and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(value, processes: int = 1) -> int:
    """Loading processes per training process: `value` when it is a number, else ('auto', None or -1) the cores
    shared among the node's `processes`, one kept for the process itself, at most MAX_DEFAULT_WORKERS."""
    if value not in (None, "auto", -1):
        return int(value)
    cores = available_cores() // max(1, processes)
    return max(0, min(MAX_DEFAULT_WORKERS, cores - 1))


def loader_options(device, workers: int, reused: bool = True) -> dict:
    """DataLoader keyword arguments for `workers` processes feeding `device`: pinned host memory for CUDA copies
    (to be made with non_blocking=True), and workers kept alive between epochs when the loader is `reused`."""
    import torch

    cuda = torch.device(device).type == "cuda"
    options = {"num_workers": workers, "pin_memory": cuda}
    if workers > 0:
        options["persistent_workers"] = reused
        options["prefetch_factor"] = 4 if cuda else 2
    return options
