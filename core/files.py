"""Paths of the suite, and files written atomically (a temporary file, then a rename): readers never see half.

A write that fails leaves the previous file as it was and removes its temporary; a full disk (ENOSPC) is the
user's to fix and says so in one sentence (core.cli.UserError). A temporary left by a process killed while
writing (`.<name>.<random>.tmp`) is never read as the file and is removed by `remove_leftovers`.
"""
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from core.cli import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Where generated demo data and extracted features live (override with SSL_SUITE_CACHE)."""
    return Path(os.environ.get("SSL_SUITE_CACHE", REPO_ROOT / ".cache")).expanduser()


def _temporary_beside(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return fd, Path(tmp)


def _disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC, or a writer (torch.save's zip writer) that wraps the OS error in its own on a full disk."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, RuntimeError):
        try:
            return shutil.disk_usage(folder).free == 0
        except OSError:
            return False
    return False


def _full_disk_error(path: Path) -> UserError:
    return UserError(f"no space left on the device of {path.parent} while writing {path.name}; nothing was "
                     "replaced (the previous file, if any, is intact): free some space and run the command again")


def _replace_from_temporary(path: Path, tmp: Path, write) -> None:
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _disk_full(e, path.parent):
            raise _full_disk_error(path) from None
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _temporary_beside(path)

    def write(target):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _replace_from_temporary(path, tmp, write)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(path, write) -> None:
    """`write(temporary path)` (torch.save, np.savez, ...) and a rename to `path`."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    _replace_from_temporary(path, tmp, write)


def is_temporary(path: Path) -> bool:
    """A temporary of the atomic writers (`.<name>.<random>.tmp`), never a finished file."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


# A writer's temporary lives for the seconds a write takes; one this old was left by a killed process (a
# younger one may belong to a job writing into the same folder right now).
LEFTOVER_AGE_S = 15 * 60


def remove_leftovers(folder, older_than_s: float = LEFTOVER_AGE_S) -> list:
    """Remove the temporaries under `folder` older than `older_than_s` seconds; the paths removed."""
    folder, now, removed = Path(folder), time.time(), []
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # its writer finished or another process cleaned it
            pass
    return sorted(removed)


def atomic_torch_save(obj, path) -> None:
    """torch.save through a temporary file and a rename (checkpoints, feature caches, training state)."""
    import torch

    atomic_save(path, lambda tmp: torch.save(obj, tmp))


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
