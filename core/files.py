"""Paths of the suite, and files written atomically (a temporary file, then a rename): readers never see half."""
import hashlib
import json
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Where generated demo data and extracted features live (override with SSL_SUITE_CACHE)."""
    return Path(os.environ.get("SSL_SUITE_CACHE", REPO_ROOT / ".cache")).expanduser()


def _temporary_beside(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return fd, Path(tmp)


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(path, write) -> None:
    """`write(temporary path)` (torch.save, np.savez, ...) and a rename to `path`."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
