"""Small things every part of the suite needs: the user-error type, paths, atomic writes."""
import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """A mistake the user can fix; `evaluate/run.py` prints it as one sentence and exits with 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one sentence and exit code 2, like every other mistake."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def setup_distributed(want_cuda: bool):
    """Place this process: under torchrun (WORLD_SIZE > 1) join the process group (NCCL on CUDA, Gloo on CPU)
    and take the GPU of LOCAL_RANK. Returns (torch.device, rank, world size)."""
    import datetime

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # Rank 0 alone scores the test set after training while the others wait for the next collective:
        # a long timeout, so that a large test set does not end the run.
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(hours=3))
    return device, rank, world


def epoch_order(n: int, seed: int, epoch: int):
    """The image order of an epoch; depends only on (seed, epoch), so a resumed run sees the same batches."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def cache_dir() -> Path:
    """Where generated demo data and extracted features live (override with SSL_SUITE_CACHE)."""
    return Path(os.environ.get("SSL_SUITE_CACHE", REPO_ROOT / ".cache")).expanduser()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path) -> None:
    """torch.save through a temporary file and a rename (checkpoints, feature caches)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_cli(main, argv=None, failures=()) -> int:
    """Run `main(argv)` with the suite's exit codes: 0 done; 2 and one sentence for a UserError;
    1 and one sentence for the exception types in `failures`; 1 and a traceback for anything else (a bug)."""
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing unfinished was written", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
